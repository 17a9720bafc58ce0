"""The registry: every family swap knows, in the order they are tried (the first whose ``matches`` and
``spec`` accept a layer is probed; put specific layouts before general ones). Adding a family is one file in
this folder and one line here."""
from __future__ import annotations

from .agn_grid import AgnGrid
from .biggan import BigGan
from .cbam import Cbam, LightCbam
from .cbam_authors import CbamAuthors
from .channel_gates import ChannelGates
from .grid import Grid
from .ltpa_linear import LtpaLinear
from .monai_attention import MonaiAttention
from .ran_port import RanPort
from .residual_attention import ResidualAttention
from .sagan import Sagan
from .sagan_projected import SaganProjected
from .timm_global_context import TimmGlobalContext
from .timm_nonlocal import TimmNonLocal

FAMILIES = (
    Grid(),
    Sagan(),
    SaganProjected(),  # after Sagan: SAGAN layers whose projections SelfAttention2d cannot hold
    BigGan(),
    TimmNonLocal(),
    ResidualAttention(),
    Cbam(),
    LightCbam(),
    CbamAuthors(),
    LtpaLinear(),
    TimmGlobalContext(),
    AgnGrid(),
    MonaiAttention(),
    # recognised, only partly fusable / out of scope
    RanPort(),
    ChannelGates(),
)

__all__ = ["FAMILIES"]
