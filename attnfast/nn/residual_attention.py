"""Residual attention module whose ``(1 + M) * T`` gate runs the fused ``attnfast::residual_gate`` op."""
from __future__ import annotations

import torch

from ..ops.residual_gate import residual_gate
from ..reference.residual_attention import ResidualAttentionModule as _Reference


class ResidualAttentionModule(_Reference):
    """Drop-in for ``attnfast.reference.ResidualAttentionModule`` (same parameters and names).

    Under autocast the mask branch and the trunk can end in different dtypes (a 16-bit convolution
    output, an fp32 residual sum); the gate then runs in their promoted dtype, as the reference's
    ``(1 + sigmoid(m)) * t`` does by type promotion."""

    def gate(self, mask_logits, trunk):
        dt = torch.promote_types(mask_logits.dtype, trunk.dtype)
        return residual_gate(mask_logits.to(dt), trunk.to(dt))
