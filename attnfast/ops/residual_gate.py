"""``attnfast::residual_gate``: ``(1 + sigmoid(m)) * t`` as a torch.library custom op.

CUDA tensors (or ``ATTNFAST_BACKEND=triton``) run ``attnfast.kernels.residual_gate``; otherwise a
PyTorch path. Backward is its own custom op, so it dispatches the same way and nothing but the
two inputs is saved (``sigmoid(m)`` is recomputed). The output (and the gradients) keep the trunk's
layout, so operands that share one dense layout (contiguous or channels_last activations) take the
kernels' dense path (32-bit flat offsets); anything else (stride-0 gradients, views, mixed layouts)
takes the strided one.

The PyTorch path on CPU: when the operands share one dense layout, the work is split into chunks of
``CPU_CHUNK_ELEMS`` elements that ``attnfast._cpu_pool`` workers take one at a time, and each chunk runs all of
its ops while it is in the worker's cache (eager's three ops forward, five backward, one pass over memory
instead of one per op, no op waiting for every thread on busy cores). Chunks start at multiples of 64 elements,
so ATen's vectorized loops see what they see in one single-threaded eager op: fp32/fp64 results are the bits of
single-threaded eager (multi-threaded eager splits its loops by thread count, which can move a few bits). Other
layouts, and other devices, run the same ops on the whole tensors, ``sigmoid(m)`` in m's own layout; 16-bit
inputs compute in fp32 and round once.
"""
from __future__ import annotations

import torch

from .. import _alloc, _cpu_pool
from .._checks import check_same, check_tensor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible


# Elements per task of the CPU path (rounded down to a multiple of 64): the forward's three tensors (the
# backward's five) of 2**17 fp32 elements stay in a core's cache between the chunk's ops; 2**17 and 2**18 were the
# fastest of 2**15 to 2**20 on the 2-core development machine (B=8, 256x56x56). See benchmarks/cpu_load.py.
CPU_CHUNK_ELEMS = 1 << 17


def _flat_chunks(*tensors):
    """1-D views of CPU tensors that share one dense layout (same element at the same flat offset) and their chunk
    starts (multiples of 64), or None for any other layout or device."""
    from ..kernels._strided import shared_dense_layout  # a plain layout helper: no Triton import

    first = tensors[0]
    if first.device.type != "cpu" or first.numel() == 0 or not shared_dense_layout(*tensors):
        return None
    n = first.numel()
    flat = [t.as_strided((n,), (1,), t.storage_offset()) for t in tensors]
    step = max(64, CPU_CHUNK_ELEMS // 64 * 64)
    return flat, step, range(0, n, step)


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
    if out.dtype == ct:  # eager's three ops, in place in out: no temporaries
        chunks = _flat_chunks(m, t, out)
        if chunks is None:  # sigmoid in m's own layout, as eager's
            return torch.mul(torch.sigmoid(m).add_(1), t, out=out)
        (mf, tf, of), step, starts = chunks

        def task(i):
            j = slice(i, i + step)
            torch.sigmoid(mf[j], out=of[j]).add_(1).mul_(tf[j])

        _cpu_pool.run_tasks(task, starts)
        return out
    return out.copy_(torch.sigmoid(m.to(ct)).add_(1).mul_(t))  # 16-bit: fp32 arithmetic, one rounding


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
    # Eager's backward of (1 + s) * t, op for op (dM = sigmoid_backward(g * t, s), dT = g * (1 + s)), in the
    # output buffers: five ops, chunk by chunk in a worker's cache where the layout allows.
    ct = compute_dtype(t)
    if dm.dtype == ct:
        def ops(g, m, t, dm, dt):
            s = torch.sigmoid(m, out=dt)
            torch.ops.aten.sigmoid_backward.grad_input(torch.mul(g, t, out=dm), s, grad_input=dm)
            dt.add_(1).mul_(g)

        chunks = _flat_chunks(grad, m, t, dm, dt)
        if chunks is None:  # sigmoid in m's own layout, as eager's
            s = torch.sigmoid(m)
            torch.ops.aten.sigmoid_backward.grad_input(torch.mul(grad, t, out=dm), s, grad_input=dm)
            torch.mul(s.add_(1), grad, out=dt)
            return dm, dt
        flat, step, starts = chunks
        _cpu_pool.run_tasks(lambda i: ops(*(f[i:i + step] for f in flat)), starts)
        return dm, dt
    s = torch.sigmoid(m.to(ct))
    g = grad.to(ct)
    dm.copy_(torch.ops.aten.sigmoid_backward(g * t, s))
    dt.copy_(s.add_(1).mul_(g))
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
