"""Residual attention module whose ``(1 + M) * T`` gate runs the fused ``attnfast::residual_gate`` op."""
from __future__ import annotations

from ..ops.residual_gate import residual_gate
from ..reference.residual_attention import ResidualAttentionModule as _Reference


class ResidualAttentionModule(_Reference):
    """Drop-in for ``attnfast.reference.ResidualAttentionModule`` (same parameters and names)."""

    def gate(self, mask_logits, trunk):
        return residual_gate(mask_logits, trunk)
