"""Fused attention-residual gate of the Residual Attention Network: ``out = (1 + sigmoid(m)) * t``.

Forward reads ``m`` and ``t`` once and writes ``out``; backward reads ``grad, m, t`` once and
writes ``dm = grad * t * s * (1 - s)`` and ``dt = grad * (1 + s)``, with ``s = sigmoid(m)``
recomputed instead of stored. Math is fp32 whatever the storage dtype.

Two kernels per direction:

- dense (``*_dense_kernel``): every operand has one and the same dense layout (contiguous,
  channels_last, or any other permutation without gaps) and fewer than ``2**31 - BLOCK`` elements.
  The kernel walks 32-bit flat offsets shared by all operands: no index arithmetic beyond one
  multiply-add, and the loads/stores vectorize. This is what a model's activations hit.
- strided: any strides (stride 0 from ``expand``/``.sum()`` gradients included): the flat index in
  the output's memory order is decomposed into 4-D coordinates (64-bit div/mod) and every input is
  read through its own strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DTYPES, on_device  # noqa: F401 (DTYPES: the one table)
from ._strided import permuted_views, shared_dense_layout

BLOCK = 1024
NUM_WARPS = 4
MAX_DENSE_NUMEL = 2 ** 31 - BLOCK  # the last program's masked lanes stay below 2**31 too


@triton.jit
def _offsets(offs, S1, S2, S3, s0, s1, s2, s3):
    i3 = offs % S3
    r = offs // S3
    i2 = r % S2
    r = r // S2
    i1 = r % S1
    i0 = r // S1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def _gate(m, t):
    return (1.0 + tl.sigmoid(m)) * t


@triton.jit
def _gate_grads(g, m, t):
    s = tl.sigmoid(m)
    return g * t * s * (1.0 - s), g * (1.0 + s)


@triton.jit
def residual_gate_fwd_dense_kernel(m_ptr, t_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: numel <= MAX_DENSE_NUMEL
    mask = offs < numel
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _gate(m, t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def residual_gate_bwd_dense_kernel(g_ptr, m_ptr, t_ptr, dm_ptr, dt_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dm, dt = _gate_grads(g, m, t)
    tl.store(dm_ptr + offs, dm.to(dm_ptr.dtype.element_ty), mask=mask)
    tl.store(dt_ptr + offs, dt.to(dt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def residual_gate_fwd_kernel(m_ptr, t_ptr, out_ptr, numel, S1, S2, S3,
                             ms0, ms1, ms2, ms3, ts0, ts1, ts2, ts3,
                             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    m = tl.load(m_ptr + _offsets(offs, S1, S2, S3, ms0, ms1, ms2, ms3), mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + _offsets(offs, S1, S2, S3, ts0, ts1, ts2, ts3), mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _gate(m, t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def residual_gate_bwd_kernel(g_ptr, m_ptr, t_ptr, dm_ptr, dt_ptr, numel, S1, S2, S3,
                             gs0, gs1, gs2, gs3, ms0, ms1, ms2, ms3, ts0, ts1, ts2, ts3,
                             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + _offsets(offs, S1, S2, S3, gs0, gs1, gs2, gs3), mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + _offsets(offs, S1, S2, S3, ms0, ms1, ms2, ms3), mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + _offsets(offs, S1, S2, S3, ts0, ts1, ts2, ts3), mask=mask, other=0.0).to(tl.float32)
    dm, dt = _gate_grads(g, m, t)
    tl.store(dm_ptr + offs, dm.to(dm_ptr.dtype.element_ty), mask=mask)
    tl.store(dt_ptr + offs, dt.to(dt_ptr.dtype.element_ty), mask=mask)


def uses_dense_path(*tensors: torch.Tensor) -> bool:
    """Whether the launchers take the dense kernels for these operands (output(s) included)."""
    return tensors[0].numel() <= MAX_DENSE_NUMEL and shared_dense_layout(*tensors)


def residual_gate_fwd(m: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``(1 + sigmoid(m)) * t`` into ``out`` (same shape, dense; any strides for m, t)."""
    numel = out.numel()
    if not numel:
        return out
    grid = (triton.cdiv(numel, BLOCK),)
    with on_device(out):
        if uses_dense_path(out, m, t):
            residual_gate_fwd_dense_kernel[grid](m, t, out, numel, BLOCK=BLOCK, num_warps=NUM_WARPS)
        else:
            sizes, (_, ms, ts) = permuted_views(out, m, t)
            residual_gate_fwd_kernel[grid](m, t, out, numel, sizes[1], sizes[2], sizes[3], *ms, *ts,
                                           BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def residual_gate_bwd(grad: torch.Tensor, m: torch.Tensor, t: torch.Tensor,
                      dm: torch.Tensor, dt: torch.Tensor):
    """Write the gate's input gradients into ``dm`` and ``dt`` (both laid out alike, dense)."""
    if dm.stride() != dt.stride():
        raise ValueError("dm and dt must share strides")
    numel = dm.numel()
    if not numel:
        return dm, dt
    grid = (triton.cdiv(numel, BLOCK),)
    with on_device(dm):
        if uses_dense_path(dm, dt, grad, m, t):
            residual_gate_bwd_dense_kernel[grid](grad, m, t, dm, dt, numel, BLOCK=BLOCK, num_warps=NUM_WARPS)
        else:
            sizes, (_, gs, ms, ts) = permuted_views(dm, grad, m, t)
            residual_gate_bwd_kernel[grid](grad, m, t, dm, dt, numel, sizes[1], sizes[2], sizes[3],
                                           *gs, *ms, *ts, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dm, dt


def aot_configs() -> list:
    """Both paths, both directions, every dtype: the dense kernels with a 32-bit ``numel``, the
    strided ones with a 64-bit one."""
    from .aot.registry import KernelConfig, signature

    configs = []
    cx = {"BLOCK": BLOCK}
    for dt in DTYPES.values():
        for kind, kernel, ptrs, scalars in (
                ("fwd", residual_gate_fwd_kernel, ("m_ptr", "t_ptr", "out_ptr"), {"numel": "i64"}),
                ("bwd", residual_gate_bwd_kernel, ("g_ptr", "m_ptr", "t_ptr", "dm_ptr", "dt_ptr"), {"numel": "i64"}),
                ("fwd_dense", residual_gate_fwd_dense_kernel, ("m_ptr", "t_ptr", "out_ptr"), {"numel": "i32"}),
                ("bwd_dense", residual_gate_bwd_dense_kernel, ("g_ptr", "m_ptr", "t_ptr", "dm_ptr", "dt_ptr"),
                 {"numel": "i32"})):
            name = f"residual_gate.{kind}[{dt},BLOCK={BLOCK}]"
            configs.append(KernelConfig(
                name=name, kernel=kernel, constexprs=cx, num_warps=NUM_WARPS,
                signature=signature(kernel, ptrs={p: dt for p in ptrs}, scalars=scalars, constexprs=cx)))
    return configs
