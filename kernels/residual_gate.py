"""Fused attention-residual gate of the Residual Attention Network: ``out = (1 + sigmoid(m)) * t``.

Forward reads ``m`` and ``t`` once and writes ``out``; backward reads ``grad, m, t`` once and
writes ``dm = grad * t * s * (1 - s)`` and ``dt = grad * (1 + s)``, with ``s = sigmoid(m)``
recomputed instead of stored. Math is fp32 whatever the storage dtype. Any layout and strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._strided import permuted_views
from .registry import KernelConfig, signature

BLOCK = 1024
NUM_WARPS = 4
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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
def residual_gate_fwd_kernel(m_ptr, t_ptr, out_ptr, numel, S1, S2, S3,
                             ms0, ms1, ms2, ms3, ts0, ts1, ts2, ts3,
                             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    m = tl.load(m_ptr + _offsets(offs, S1, S2, S3, ms0, ms1, ms2, ms3), mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + _offsets(offs, S1, S2, S3, ts0, ts1, ts2, ts3), mask=mask, other=0.0).to(tl.float32)
    out = (1.0 + tl.sigmoid(m)) * t
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def residual_gate_bwd_kernel(g_ptr, m_ptr, t_ptr, dm_ptr, dt_ptr, numel, S1, S2, S3,
                             gs0, gs1, gs2, gs3, ms0, ms1, ms2, ms3, ts0, ts1, ts2, ts3,
                             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + _offsets(offs, S1, S2, S3, gs0, gs1, gs2, gs3), mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + _offsets(offs, S1, S2, S3, ms0, ms1, ms2, ms3), mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + _offsets(offs, S1, S2, S3, ts0, ts1, ts2, ts3), mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(m)
    tl.store(dm_ptr + offs, (g * t * s * (1.0 - s)).to(dm_ptr.dtype.element_ty), mask=mask)
    tl.store(dt_ptr + offs, (g * (1.0 + s)).to(dt_ptr.dtype.element_ty), mask=mask)


def residual_gate_fwd(m: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``(1 + sigmoid(m)) * t`` into ``out`` (same shape, dense; any strides for m, t)."""
    sizes, (_, ms, ts) = permuted_views(out, m, t)
    numel = out.numel()
    if numel:
        grid = (triton.cdiv(numel, BLOCK),)
        residual_gate_fwd_kernel[grid](m, t, out, numel, sizes[1], sizes[2], sizes[3], *ms, *ts,
                                       BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def residual_gate_bwd(grad: torch.Tensor, m: torch.Tensor, t: torch.Tensor,
                      dm: torch.Tensor, dt: torch.Tensor):
    """Write the gate's input gradients into ``dm`` and ``dt`` (both laid out alike, dense)."""
    if dm.stride() != dt.stride():
        raise ValueError("dm and dt must share strides")
    sizes, (_, gs, ms, ts) = permuted_views(dm, grad, m, t)
    numel = dm.numel()
    if numel:
        grid = (triton.cdiv(numel, BLOCK),)
        residual_gate_bwd_kernel[grid](grad, m, t, dm, dt, numel, sizes[1], sizes[2], sizes[3],
                                       *gs, *ms, *ts, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dm, dt


def aot_configs() -> list:
    configs = []
    for dt in DTYPES.values():
        configs.append(KernelConfig(
            name=f"residual_gate.fwd[{dt},BLOCK={BLOCK}]", kernel=residual_gate_fwd_kernel,
            signature=signature(residual_gate_fwd_kernel, ptrs={"m_ptr": dt, "t_ptr": dt, "out_ptr": dt},
                                scalars={"numel": "i64"}, constexprs={"BLOCK": BLOCK}),
            constexprs={"BLOCK": BLOCK}, num_warps=NUM_WARPS))
        configs.append(KernelConfig(
            name=f"residual_gate.bwd[{dt},BLOCK={BLOCK}]", kernel=residual_gate_bwd_kernel,
            signature=signature(residual_gate_bwd_kernel,
                                ptrs={"g_ptr": dt, "m_ptr": dt, "t_ptr": dt, "dm_ptr": dt, "dt_ptr": dt},
                                scalars={"numel": "i64"}, constexprs={"BLOCK": BLOCK}),
            constexprs={"BLOCK": BLOCK}, num_warps=NUM_WARPS))
    return configs
