"""Grid attention whose whole forward/backward runs the fused ``attnfast::grid_attention`` op.

Drop-in for ``attnfast.reference.GridAttention``: same constructor, parameter names
(``W_l``, ``W_g``, ``phi``) and ``forward(l, g) -> (a, pooled)``, so state dicts load both ways.
Under autocast, inputs and weights are cast to the autocast dtype, as the reference's 1x1
convolutions would be (the op itself accumulates in fp32).
"""
from __future__ import annotations

from .._checks import autocast_dtype
from ..ops.grid_attention import grid_attention
from ..reference.grid_attention import GridAttention as _Reference


class GridAttention(_Reference):
    """Fused grid attention (Triton on CUDA, a recomputing PyTorch path on CPU)."""

    def forward(self, l, g):
        self.check_inputs(l, g)
        params = (self.W_l.weight, self.W_g.weight, self.phi.weight, self.phi.bias)
        amp = autocast_dtype(l.device.type)
        if amp is not None:
            l, g = l.to(amp), g.to(amp)
            params = tuple(p.to(amp) for p in params)
        return grid_attention(l, g, *params, self.up_factor, self.normalize_attn)
