"""Attention-Gated-Networks' ``GridAttentionBlock2D`` (ozan-oktay/Attention-Gated-Networks
``models/layers/grid_attention_layer.py``, ``_GridAttentionBlockND``): ``theta`` (strided conv on x), ``phi``
(conv on g, upsampled), ``psi`` (to one channel), sigmoid, upsampled map times x, ``W`` (conv + BatchNorm); returns
``(W_y, sigm_psi_f)``. Recognised; no fused op yet (strided theta, trilinear/bilinear resampling of the map).
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Family, has_modules
from ..report import NO_OP


class AgnGrid(Family):
    name = "agn_grid"
    title = "Attention-Gated-Networks GridAttentionBlock2D"
    status = NO_OP

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, "theta", "phi", "psi", "W") and hasattr(m, "mode")

    def explain(self, m: nn.Module) -> str:
        return (f"mode {getattr(m, 'mode', '?')!r}: needs a fused gating op with a strided theta and resampled "
                "attention map")
