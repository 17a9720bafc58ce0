"""Channel-only gates: squeeze-and-excitation and its kin (timm ``SEModule``, ``EffectiveSEModule``,
``SqueezeExcite``/``SqueezeExciteCl``, ``EcaModule``, ``CecaModule``; torchvision ``SqueezeExcitation``; users'
``SELayer``/``SEBlock`` copies). Out of scope by design: a (B, C) gate from globally pooled features costs one
pass over the map, which eager PyTorch already does well; attnfast fuses spatial attention.

Recognised by class (timm, torchvision) or by a name token (se, squeeze, excitation, eca, ...) with only 1x1 /
Linear / Conv1d layers inside (no spatial convolution).
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Family, is_instance_of_loaded
from ..scan import tokens
from ..report import OUT_OF_SCOPE

_CLASSES = {
    "timm.layers.squeeze_excite": ("SEModule", "EffectiveSEModule", "SqueezeExcite", "SqueezeExciteCl"),
    "timm.layers.eca": ("EcaModule", "CecaModule"),
    "timm.models._efficientnet_blocks": ("SqueezeExcite",),
    "torchvision.ops.misc": ("SqueezeExcitation",),
}
_TOKENS = {"se", "ese", "squeeze", "excitation", "excite", "eca", "ceca", "cse", "channelgate", "channelattention"}


def channel_only(m: nn.Module) -> bool:
    """Only 1x1 convolutions, Linear and Conv1d layers (ECA) inside: nothing mixes neighbouring pixels."""
    layers = [s for s in m.modules() if isinstance(s, (nn.Conv2d, nn.Conv1d, nn.Linear))]
    return bool(layers) and all(not isinstance(s, nn.Conv2d) or s.kernel_size == (1, 1) for s in layers)


class ChannelGates(Family):
    name = "channel_gate"
    title = "channel-only gate (SE / ECA)"
    status = OUT_OF_SCOPE

    def matches(self, m: nn.Module) -> bool:
        if any(is_instance_of_loaded(m, mod, *names) for mod, names in _CLASSES.items()):
            return True
        return bool(tokens(type(m).__name__) & _TOKENS) and channel_only(m)

    def explain(self, m: nn.Module) -> str:
        return ("a channel-only gate (SE/ECA-style): one pass over the map that eager PyTorch does well; "
                "swap fuses spatial attention (grid, self-attention, CBAM)")
