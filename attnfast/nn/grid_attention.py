"""Grid attention whose whole forward/backward runs the fused ``attnfast::grid_attention`` op.

Drop-in for ``attnfast.reference.GridAttention``: same constructor, parameter names
(``W_l``, ``W_g``, ``phi``) and ``forward(l, g) -> (a, pooled)``, so state dicts load both ways.
"""
from __future__ import annotations

from ..ops.grid_attention import grid_attention
from ..reference.grid_attention import GridAttention as _Reference


class GridAttention(_Reference):
    """Fused grid attention (Triton on CUDA, a recomputing PyTorch path on CPU)."""

    def forward(self, l, g):
        self.check_inputs(l, g)
        return grid_attention(l, g, self.W_l.weight, self.W_g.weight, self.phi.weight, self.phi.bias,
                              self.up_factor, self.normalize_attn)
