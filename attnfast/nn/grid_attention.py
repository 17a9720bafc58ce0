"""Grid attention whose whole forward/backward runs the fused ``attnfast::grid_attention`` op.

Drop-in for ``attnfast.reference.GridAttention``: same constructor, parameter names
(``W_l``, ``W_g``, ``phi``) and ``forward(l, g) -> (a, pooled)``, so state dicts load both ways.
Under autocast, inputs and weights are cast to the autocast dtype, as the reference's 1x1
convolutions would be (the op itself accumulates in fp32); ``pooled`` comes back in the dtype the
reference's ``a * l`` promotes to (fp32 for an fp32 ``l``), ``a`` / ``c`` in the autocast dtype.

``return_logits=True`` returns ``(c, pooled)`` with the logits ``c`` (B, 1, H, W) before the
softmax/sigmoid, as Learn to Pay Attention's ``GridAttentionBlock`` does. ``c``'s value is the one the
op computes anyway (no extra forward work, nothing A x H x W kept). A gradient that flows into ``c``
itself (rare: LTPA only visualizes ``c``) is computed in backward by recomputing ``c`` in PyTorch, which
briefly builds the (B, A, H, W) intermediate; the gradient through ``pooled`` stays fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import autocast_dtype
from ..ops.grid_attention import check_grid_inputs, grid_attention, grid_attention_op
from ..reference.grid_attention import GridAttention as _Reference


def _torch_logits(l, g, w_l, w_g, phi_w, phi_b, up_factor: int) -> torch.Tensor:
    g_ = F.conv2d(g, w_g)
    if up_factor > 1:
        g_ = F.interpolate(g_, scale_factor=up_factor, mode="bilinear", align_corners=False)
    return F.conv2d(F.relu(F.conv2d(l, w_l) + g_), phi_w, phi_b)


class _Logits(torch.autograd.Function):
    """``c`` with the op's forward value and, only if ``c`` gets a gradient, a recomputed backward."""

    @staticmethod
    def forward(ctx, logits, up_factor, l, g, w_l, w_g, phi_w, phi_b):
        ctx.save_for_backward(l, g, w_l, w_g, phi_w, phi_b)
        ctx.up_factor = up_factor
        return logits.to(l.dtype).view(l.shape[0], 1, l.shape[2], l.shape[3])

    @staticmethod
    def backward(ctx, dc):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved, ctx.needs_input_grad[2:])]
        with torch.enable_grad():
            c = _torch_logits(*inputs, ctx.up_factor)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(c, wanted, dc) if wanted else ())
        return (None, None, *[next(grads) if t.requires_grad else None for t in inputs])


class GridAttention(_Reference):
    """Fused grid attention (Triton on CUDA, a recomputing PyTorch path on CPU)."""

    def forward(self, l, g):
        self.check_inputs(l, g)
        params = (self.W_l.weight, self.W_g.weight, self.phi.weight, self.phi.bias)
        amp = autocast_dtype(l.device.type)
        pooled_dtype = l.dtype
        if amp is not None:
            pooled_dtype = torch.promote_types(amp, l.dtype)
            l, g = l.to(amp), g.to(amp)
            params = tuple(p.to(amp) for p in params)
        if not self.return_logits:
            a, pooled = grid_attention(l, g, *params, self.up_factor, self.normalize_attn)
            return a, pooled.to(pooled_dtype)
        check_grid_inputs(l, g, *params, self.up_factor)
        _, pooled, logits, _, _ = grid_attention_op(l, g, *params, self.up_factor, bool(self.normalize_attn))
        return _Logits.apply(logits, self.up_factor, l, g, *params), pooled.to(pooled_dtype)
