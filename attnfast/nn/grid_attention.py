"""Grid attention whose whole forward/backward runs the fused ``attnfast::grid_attention`` op.

Drop-in for ``attnfast.reference.GridAttention`` (a subclass: same constructor, parameter names
``W_l``, ``W_g``, ``phi`` and ``forward(l, g) -> (a, pooled)``, so state dicts load both ways). The op
validates ``l``, ``g`` and the weights (ValueError); the module adds nothing to that. Under autocast,
floating inputs and weights are cast to the autocast dtype, as the reference's 1x1 convolutions would be
(the op itself accumulates in fp32); ``pooled`` comes back in the dtype the reference's ``a * l`` promotes
to (fp32 for an fp32 ``l``), ``a`` / ``c`` in the autocast dtype.

``return_logits=True`` returns ``(c, pooled)`` with the logits ``c`` (B, 1, H, W) before the
softmax/sigmoid, as Learn to Pay Attention's ``GridAttentionBlock`` does: an output of the op (no extra
forward work, nothing A x H x W kept), whose gradient, when ``c`` enters the loss, goes through the op's
own backward.
"""
from __future__ import annotations

import torch

from .._dispatch import autocast_dtype
from ..ops.grid_attention import grid_attention
from ..reference.grid_attention import GridAttention as _Reference


class GridAttention(_Reference):
    """Fused grid attention (Triton on CUDA, a recomputing PyTorch path on CPU)."""

    def forward(self, l, g):
        params = (self.W_l.weight, self.W_g.weight, self.phi.weight, self.phi.bias)
        amp = autocast_dtype(l.device.type) if isinstance(l, torch.Tensor) else None
        pooled_dtype = getattr(l, "dtype", None)
        if amp is not None and l.is_floating_point():
            pooled_dtype = torch.promote_types(amp, l.dtype)
            l = l.to(amp)
            g = g.to(amp) if isinstance(g, torch.Tensor) and g.is_floating_point() else g
            params = tuple(p.to(amp) for p in params)
        attn, pooled = grid_attention(l, g, *params, self.up_factor, self.normalize_attn,
                                      return_logits=self.return_logits)
        return attn, pooled.to(pooled_dtype)
