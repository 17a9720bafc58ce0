"""Learn to Pay Attention's ``LinearAttentionBlock`` (SaoYan/LearnToPayAttention ``blocks.py``): ``c = op(l + g)``
with ``op`` a bias-free 1x1 conv to one channel, softmax (or sigmoid) over space, weighted sum (or average) of
``l``; returns ``(c, pooled)``. Recognised; no fused op yet (the grid op's ``W_l``/``W_g`` projections do not
exist here). A family file with a fused module replaces this one when the op lands.
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Family, is_conv1x1
from ..report import NO_OP


class LtpaLinear(Family):
    name = "ltpa_linear"
    title = "Learn to Pay Attention LinearAttentionBlock"
    status = NO_OP

    def matches(self, m: nn.Module) -> bool:
        op = m._modules.get("op")
        return is_conv1x1(op) and op.out_channels == 1 and hasattr(m, "normalize_attn")

    def explain(self, m: nn.Module) -> str:
        return "needs a fused linear-attention op (c = op(l + g), no W_l/W_g projections)"
