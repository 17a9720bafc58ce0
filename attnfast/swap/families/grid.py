"""Grid attention: attnfast's reference ``GridAttention``, the seeds' ``AttentionBlock`` (AttnMel tutorial) and
Learn to Pay Attention's ``GridAttentionBlock`` (SaoYan/LearnToPayAttention ``blocks.py``, which returns the logits
``c``) -> ``attnfast.nn.GridAttention``.

Layout: children ``W_l``, ``W_g`` (1x1 ``nn.Conv2d`` without bias), ``phi`` (1x1 to one channel, with bias);
attributes ``up_factor`` (positive int) and ``normalize_attn`` (bool). Candidates: returning ``a`` or the logits
``c`` (one of them for attnfast's own class, whose ``return_logits`` says which).
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.grid_attention import GridAttention as Fused
from ...reference.grid_attention import GridAttention as Reference
from ..family import Candidate, Family, NotSwappable, Spec, has_modules, randn, require_conv1x1, require_tensors

TENSORS = {"W_l.weight", "W_g.weight", "phi.weight", "phi.bias"}
LOGITS_NOTE = "returns the logits c (before the softmax/sigmoid) like the original"


class Grid(Family):
    name = "grid"
    title = "grid attention (AttnMel AttentionBlock, Learn to Pay Attention GridAttentionBlock)"
    fused = Fused
    reference = Reference
    fused_runs = frozenset()  # the fused op reads W_l/W_g/phi's weights; it calls none of them
    reads = frozenset({"up_factor", "normalize_attn", "return_logits"})

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, "W_l", "W_g", "phi")

    def spec(self, m: nn.Module) -> Spec:
        W_l = require_conv1x1(m.W_l, "W_l", bias=False)
        W_g = require_conv1x1(m.W_g, "W_g", bias=False)
        phi = require_conv1x1(m.phi, "phi", bias=True, out_channels=1)
        if W_l.out_channels != W_g.out_channels or phi.in_channels != W_l.out_channels:
            raise NotSwappable(f"W_l, W_g and phi disagree on attn_features ({W_l.out_channels}, "
                               f"{W_g.out_channels}, {phi.in_channels})")
        up, norm = getattr(m, "up_factor", None), getattr(m, "normalize_attn", None)
        if isinstance(up, bool) or not isinstance(up, (int, float)) or int(up) != up or up < 1:
            raise NotSwappable(f"up_factor must be a positive integer attribute; got {up!r}")
        if not isinstance(norm, bool):
            raise NotSwappable(f"normalize_attn must be a bool attribute; got {norm!r}")
        require_tensors(m, TENSORS)
        up = int(up)
        known = m.return_logits if isinstance(m, Reference) else None
        candidates = [Candidate({"normalize_attn": norm, "return_logits": rl}, note=LOGITS_NOTE if rl else "")
                      for rl in ([known] if known is not None else [False, True])]
        side = max(1, 8 // up)  # g is side x (side + 1), l is up_factor times that

        def inputs(gen, dtype, device):
            return (randn(gen, dtype, device, 2, W_l.in_channels, side * up, (side + 1) * up),
                    randn(gen, dtype, device, 2, W_g.in_channels, side, side + 1))

        return Spec((W_l.in_channels, W_g.in_channels, W_l.out_channels, up), candidates, inputs)
