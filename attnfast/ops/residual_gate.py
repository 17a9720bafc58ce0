"""``attnfast::residual_gate``: ``(1 + sigmoid(m)) * t`` as a torch.library custom op.

CUDA tensors (or ``ATTNFAST_BACKEND=triton``) run ``attnfast.kernels.residual_gate``; otherwise a
PyTorch path. Backward is its own custom op, so it dispatches the same way and nothing but the
two inputs is saved (``sigmoid(m)`` is recomputed). The output (and the gradients) keep the trunk's
layout, so operands that share one dense layout (contiguous or channels_last activations) take the
kernels' dense path (32-bit flat offsets); anything else (stride-0 gradients, views, mixed layouts)
takes the strided one.
"""
from __future__ import annotations

import torch

from .. import _alloc
from .._checks import check_same, check_tensor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible


def check_residual_gate_inputs(m: torch.Tensor, t: torch.Tensor) -> None:
    """ValueError for anything the op cannot compute (what was expected is in the message)."""
    check_tensor(m, "mask_logits")
    check_tensor(t, "trunk")
    check_same({"mask_logits": m, "trunk": t})
    if m.shape != t.shape:
        raise ValueError(f"mask_logits and trunk must have the same shape; got {tuple(m.shape)} "
                         f"and {tuple(t.shape)}")
    if m.dim() > 4:
        raise ValueError(f"residual_gate supports tensors of at most 4 dims; got {m.dim()}")


@torch.library.custom_op("attnfast::residual_gate", mutates_args=())
@autocast_off
def residual_gate_op(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Outputs and gradients are allocated like the trunk (preserve_format: channels_last stays so).
    out = _alloc.empty_like(t)
    if kernel_eligible("residual_gate", m, t):
        from ..kernels.residual_gate import residual_gate_fwd

        return residual_gate_fwd(m, t, out)
    ct = compute_dtype(t)
    return out.copy_((1 + torch.sigmoid(m.to(ct))) * t.to(ct))


@residual_gate_op.register_fake
def _(m, t):
    return torch.empty_like(t)


@torch.library.custom_op("attnfast::residual_gate_backward", mutates_args=())
@autocast_off
def residual_gate_backward_op(grad: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dm = _alloc.empty_like(t)
    dt = _alloc.empty_like(dm)
    if kernel_eligible("residual_gate", m, t, grad):
        from ..kernels.residual_gate import residual_gate_bwd

        return residual_gate_bwd(grad, m, t, dm, dt)
    ct = compute_dtype(t)
    s = torch.sigmoid(m.to(ct))
    g = grad.to(ct)
    dm.copy_(g * t.to(ct) * s * (1 - s))
    dt.copy_(g * (1 + s))
    return dm, dt


@residual_gate_backward_op.register_fake
def _(grad, m, t):
    return torch.empty_like(t), torch.empty_like(t)


def _setup_context(ctx, inputs, output):
    m, t = inputs
    ctx.save_for_backward(m, t)


def _backward(ctx, grad):
    m, t = ctx.saved_tensors
    dm, dt = residual_gate_backward_op(grad, m, t)
    return dm, dt


residual_gate_op.register_autograd(_backward, setup_context=_setup_context)


def residual_gate(mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """``(1 + sigmoid(mask_logits)) * trunk``, fused; validates its inputs."""
    check_residual_gate_inputs(mask_logits, trunk)
    return residual_gate_op(mask_logits, trunk)
