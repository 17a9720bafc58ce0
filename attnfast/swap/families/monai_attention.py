"""MONAI's Attention U-Net gate (``monai.networks.nets.attentionunet.AttentionBlock``): ``psi(relu(W_g(g) +
W_x(x)))`` with conv + BatchNorm projections and a sigmoid ``psi``, times ``x``. Recognised; no fused op yet.
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Family, has_modules, is_instance_of_loaded
from ..report import NO_OP


class MonaiAttention(Family):
    name = "monai_attention"
    title = "MONAI AttentionBlock (Attention U-Net gate)"
    status = NO_OP

    def matches(self, m: nn.Module) -> bool:
        return (is_instance_of_loaded(m, "monai.networks.nets.attentionunet", "AttentionBlock")
                or has_modules(m, "W_g", "W_x", "psi"))

    def explain(self, m: nn.Module) -> str:
        return "needs a fused additive-gate op (conv + BatchNorm projections, sigmoid psi)"
