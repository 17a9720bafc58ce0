"""Learn to Pay Attention's ``LinearAttentionBlock`` (SaoYan/LearnToPayAttention ``blocks.py``) and attnfast's
reference copy -> ``attnfast.nn.LinearAttentionBlock`` (the fused ``attnfast::attention_pool`` op).

Layout: a child ``op`` (1x1 ``nn.Conv2d`` to one channel; LTPA's has no bias, one with a bias is fused too) and a
bool attribute ``normalize_attn``; ``forward(l, g) -> (c, pooled)`` with ``c = op(l + g)``, softmax over H*W and a
weighted sum (or sigmoid and an average). The probe feeds ``g`` as LTPA's models do: the global feature
(B, C, 1, 1).
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.attention_pool import LinearAttentionBlock as Fused
from ...reference.attention_pool import LinearAttentionBlock as Reference
from ..family import Candidate, Family, NotSwappable, Spec, is_conv1x1, randn, require_conv1x1, require_tensors


class LtpaLinear(Family):
    name = "ltpa_linear"
    title = "Learn to Pay Attention LinearAttentionBlock"
    fused = Fused
    reference = Reference
    fused_runs = frozenset()  # the fused op reads op's weight (and bias); it does not call op
    reads = frozenset({"normalize_attn"})

    def matches(self, m: nn.Module) -> bool:
        op = m._modules.get("op")
        return is_conv1x1(op) and op.out_channels == 1 and hasattr(m, "normalize_attn")

    def spec(self, m: nn.Module) -> Spec:
        op = require_conv1x1(m.op, "op", bias=None, out_channels=1)
        norm = m.normalize_attn
        if not isinstance(norm, bool):
            raise NotSwappable(f"normalize_attn must be a bool attribute; got {norm!r}")
        require_tensors(m, {"op.weight"} | ({"op.bias"} if op.bias is not None else set()))
        c = op.in_channels

        def inputs(gen, dtype, device):
            return randn(gen, dtype, device, 2, c, 5, 6), randn(gen, dtype, device, 2, c, 1, 1)

        return Spec((c,), [Candidate({"normalize_attn": norm})], inputs)
