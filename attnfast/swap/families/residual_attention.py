"""attnfast's reference ``ResidualAttentionModule`` -> ``attnfast.nn.ResidualAttentionModule`` (whose
``(1 + sigmoid(mask)) * trunk`` step runs the fused ``residual_gate`` op).

Only attnfast's own class: other ports of the Residual Attention Network write their modules differently
(``ran_port`` reports the popular PyTorch port's).
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.residual_attention import ResidualAttentionModule as Fused
from ...reference.residual_attention import ResidualAttentionModule as Reference
from ..family import Candidate, Family, Spec, randn


class ResidualAttention(Family):
    name = "residual_attention"
    title = "Residual Attention Network module (attnfast.reference.ResidualAttentionModule)"
    fused = Fused
    reference = Reference

    def matches(self, m: nn.Module) -> bool:
        return isinstance(m, Reference)

    def spec(self, m: nn.Module) -> Spec:
        channels = m.channels
        kwargs = {"encoder_depth": m.encoder_depth, "p": len(m.first), "t": len(m.trunk), "r": len(m.down[0])}
        side = 2 ** m.encoder_depth  # every mask level above 1x1 (the probe's cost grows with channels x side^2)

        def inputs(gen, dtype, device):
            return (randn(gen, dtype, device, 2, channels, side, side),)

        return Spec((channels,), [Candidate(kwargs)], inputs)
