"""Flash-style SAGAN self-attention: forward and backward Triton kernels.

Shapes (one "batch" index b may also be batch*heads):

- ``q``: (B, D, NQ), ``k``: (B, D, NK), ``v``: (B, DV, NK): the 1x1-conv outputs in their NCHW
  layout, read through strides (no transposed copies); D (= C/8 in SAGAN) and DV (= C) are
  arbitrary: tiles are padded to powers of two >= 16 and masked.
- ``S = scale * q^T k`` (B, NQ, NK), ``P = softmax(S)`` over keys, ``o = v P^T`` (B, DV, NQ).
- With a residual: ``out = gamma * o + x`` is written by the same kernel (``x``: (B, DV, NQ)).

The forward keeps an online softmax in fp32 (natural base: ``exp(s - lse)`` then keeps the
accuracy of eager softmax at logits ~1e3, which a base-2 rescaled ``lse`` loses) and saves ``lse = logsumexp(S)`` (natural
log, fp32, (B, NQ)) for the backward, which recomputes ``P`` blockwise (flash-attention-2):

- ``_bwd_rowsum_kernel``: ``r = rowsum(dout * o)`` (fp32). With ``dO = gamma * dout``:
  ``delta = gamma * r`` and ``dgamma = sum(r)``.
- ``_bwd_dkdv_kernel``: one program per key block, looping over query blocks: ``dV`` and ``dK``.
- ``_bwd_dq_kernel``: one program per query block, looping over key blocks: ``dQ``.

``gamma`` is folded in at the end (``dV = gamma * P^T dout`` etc.), so ``gamma * dout`` is never
formed. Value channels beyond ``BLOCK_DV`` are split over the grid's third axis; every such
program recomputes the scores (the value dim is a loop in the ``dP = dout^T v`` contraction).
The query/key dim is one padded tile (``BLOCK_D`` <= ``MAX_D``); larger D is the caller's
business (``attnfast.ops.self_attention`` uses its chunked PyTorch path there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelConfig, signature

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BLOCK_DS = (16, 32, 64, 128)  # padded query/key dims
BLOCK_DVS = (32, 128)  # padded value-channel tile (more channels: grid split)
MAX_D = BLOCK_DS[-1]
MAX_DV = BLOCK_DVS[-1]
ROWSUM_BLOCK_M = 64
ROWSUM_BLOCK_C = 32  # channel chunk of the rowsum loop (fp32 o: larger chunks spill)
NUM_WARPS = 4
NUM_STAGES = 2
LOG2E = 1.4426950408889634


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def block_dv(dv: int) -> int:
    return next(b for b in BLOCK_DVS if b >= min(dv, MAX_DV))


def supported(d: int) -> bool:
    """Whether the kernels take this query/key dim (one padded tile)."""
    return d <= MAX_D


@triton.jit
def _load_tile(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c, other):
    """Load a (len(offs_r), len(offs_c)) tile ``ptr[r * s_r + c * s_c]`` masked to (n_r, n_c)."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c, mask=mask, other=other)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, x_ptr, gamma_ptr, out_ptr, o_ptr, lse_ptr,
                scale, NQ, NK, D, DV,
                sqb, sqd, sqn, skb, skd, skn, svb, svc, svn, sxb, sxc, sxn,
                sob, soc, son, sOb, sOc, sOn, slb, residual, store_o,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_ptr += b * sqb
    k_ptr += b * skb
    v_ptr += b * svb
    q = _load_tile(q_ptr, offs_m, offs_d, sqn, sqd, NQ, D, 0.0)  # (M, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = _load_tile(k_ptr, offs_d, offs_n, skd, skn, D, NK, 0.0)  # (D, N)
        s = tl.dot(q, kt, input_precision=PREC) * scale
        s = tl.where(offs_n[None, :] < NK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = _load_tile(v_ptr, offs_n, offs_c, svn, svc, NK, DV, 0.0)  # (N, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    mask = (offs_m[:, None] < NQ) & (offs_c[None, :] < DV)
    res = o
    if residual != 0:
        g = tl.load(gamma_ptr).to(tl.float32)
        x = tl.load(x_ptr + b * sxb + offs_m[:, None] * sxn + offs_c[None, :] * sxc, mask=mask,
                    other=0.0).to(tl.float32)
        res = g * o + x
    tl.store(out_ptr + b * sob + offs_m[:, None] * son + offs_c[None, :] * soc,
             res.to(out_ptr.dtype.element_ty), mask=mask)
    if store_o != 0:  # fp32 copy of the attention output, for the backward's rowsum(dO * o)
        tl.store(o_ptr + b * sOb + offs_m[:, None] * sOn + offs_c[None, :] * sOc, o, mask=mask)
    lse = m_i + tl.log(l_i)
    if pid_c == 0:
        tl.store(lse_ptr + b * slb + offs_m, lse, mask=offs_m < NQ)


@triton.jit
def _bwd_rowsum_kernel(g_ptr, o_ptr, r_ptr, NQ, DV, sgb, sgc, sgn, sob, soc, son, srb,
                       BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c0 = tl.arange(0, BLOCK_DV)
    r = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, DV, BLOCK_DV):
        offs_c = c0 + offs_c0
        g = _load_tile(g_ptr + b * sgb, offs_m, offs_c, sgn, sgc, NQ, DV, 0.0).to(tl.float32)
        o = _load_tile(o_ptr + b * sob, offs_m, offs_c, son, soc, NQ, DV, 0.0).to(tl.float32)
        r += tl.sum(g * o, 1)
    tl.store(r_ptr + b * srb + offs_m, r, mask=offs_m < NQ)


@triton.jit
def _dk_step(pt, dpt, qt, r_ptr, offs_m, NQ, PREC: tl.constexpr):
    """dS^T = P^T * (dP^T - r) and its contribution dS^T Q^T to dK (N, D)."""
    r = tl.load(r_ptr + offs_m, mask=offs_m < NQ, other=0.0)
    dst = pt * (dpt - r[None, :])
    return tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, r_ptr, gamma_ptr, dk_ptr, dv_ptr,
                     scale, NQ, NK, D, DV,
                     sqb, sqd, sqn, skb, skd, skn, svb, svc, svn, sgb, sgc, sgn, slb,
                     sdkb, sdkd, sdkn, sdvb, sdvc, sdvn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, ONE_DV: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c0 = tl.arange(0, BLOCK_DV)
    offs_c = pid_c * BLOCK_DV + offs_c0
    offs_m0 = tl.arange(0, BLOCK_M)
    q_ptr += b * sqb
    g_ptr += b * sgb
    v_ptr += b * svb
    lse_ptr += b * slb
    r_ptr += b * slb
    k = _load_tile(k_ptr + b * skb, offs_n, offs_d, skn, skd, NK, D, 0.0)  # (N, D)
    v = _load_tile(v_ptr, offs_n, offs_c, svn, svc, NK, DV, 0.0)  # (N, DV) own channel tile
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        qt = _load_tile(q_ptr, offs_d, offs_m, sqd, sqn, D, NQ, 0.0)  # (D, M)
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < NQ, other=float("inf"))
        st = tl.dot(k, qt, input_precision=PREC) * scale  # (N, M)
        pt = tl.exp(st - lse[None, :])
        pt = tl.where((offs_m[None, :] < NQ) & (offs_n[:, None] < NK), pt, 0.0)
        gt = _load_tile(g_ptr, offs_c, offs_m, sgc, sgn, DV, NQ, 0.0)  # (DV, M) dout
        dv += tl.dot(pt.to(gt.dtype), tl.trans(gt), input_precision=PREC)
        if ONE_DV:  # one channel tile: this program owns dK
            dk += _dk_step(pt, tl.dot(v, gt, input_precision=PREC), qt, r_ptr, offs_m, NQ, PREC)
        elif pid_c == 0:  # dK needs dP over all DV channels: only the first channel tile computes it
            dpt = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for c0 in range(0, DV, BLOCK_DV):
                vc = _load_tile(v_ptr, offs_n, c0 + offs_c0, svn, svc, NK, DV, 0.0)
                gc = _load_tile(g_ptr, c0 + offs_c0, offs_m, sgc, sgn, DV, NQ, 0.0)
                dpt += tl.dot(vc, gc, input_precision=PREC)
            dk += _dk_step(pt, dpt, qt, r_ptr, offs_m, NQ, PREC)
    gm = tl.load(gamma_ptr).to(tl.float32)
    dv_mask = (offs_n[:, None] < NK) & (offs_c[None, :] < DV)
    tl.store(dv_ptr + b * sdvb + offs_n[:, None] * sdvn + offs_c[None, :] * sdvc,
             (dv * gm).to(dv_ptr.dtype.element_ty), mask=dv_mask)
    if pid_c == 0:
        dk_mask = (offs_n[:, None] < NK) & (offs_d[None, :] < D)
        tl.store(dk_ptr + b * sdkb + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
                 (dk * (gm * scale)).to(dk_ptr.dtype.element_ty), mask=dk_mask)


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, r_ptr, gamma_ptr, dq_ptr,
                   scale, NQ, NK, D, DV,
                   sqb, sqd, sqn, skb, skd, skn, svb, svc, svn, sgb, sgc, sgn, slb,
                   sdqb, sdqd, sdqn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, ONE_DV: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c0 = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_ptr += b * skb
    v_ptr += b * svb
    g_ptr += b * sgb
    q = _load_tile(q_ptr + b * sqb, offs_m, offs_d, sqn, sqd, NQ, D, 0.0)  # (M, D)
    lse = tl.load(lse_ptr + b * slb + offs_m, mask=offs_m < NQ, other=float("inf"))
    r = tl.load(r_ptr + b * slb + offs_m, mask=offs_m < NQ, other=0.0)
    if ONE_DV:
        g = _load_tile(g_ptr, offs_m, offs_c0, sgn, sgc, NQ, DV, 0.0)  # (M, DV) dout
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = _load_tile(k_ptr, offs_d, offs_n, skd, skn, D, NK, 0.0)  # (D, N)
        s = tl.dot(q, kt, input_precision=PREC) * scale
        p = tl.exp(s - lse[:, None])
        p = tl.where((offs_n[None, :] < NK) & (offs_m[:, None] < NQ), p, 0.0)
        if ONE_DV:
            vt = _load_tile(v_ptr, offs_c0, offs_n, svc, svn, DV, NK, 0.0)  # (DV, N)
            dp = tl.dot(g, vt, input_precision=PREC)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for c0 in range(0, DV, BLOCK_DV):
                gc = _load_tile(g_ptr, offs_m, c0 + offs_c0, sgn, sgc, NQ, DV, 0.0)
                vc = _load_tile(v_ptr, c0 + offs_c0, offs_n, svc, svn, DV, NK, 0.0)
                dp += tl.dot(gc, vc, input_precision=PREC)
        ds = p * (dp - r[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    gm = tl.load(gamma_ptr).to(tl.float32)
    mask = (offs_m[:, None] < NQ) & (offs_d[None, :] < D)
    tl.store(dq_ptr + b * sdqb + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             (dq * (gm * scale)).to(dq_ptr.dtype.element_ty), mask=mask)


def _prec(dtype) -> str:
    # fp32 inputs: full-precision dots (no TF32), like eager fp32 bmm.
    return "ieee" if dtype == torch.float32 else "tf32"


def blocks(d: int, dv: int) -> tuple:
    """(BLOCK_D, BLOCK_DV, ONE_DV) the launchers use for these dims (see ``aot_configs``)."""
    bd = block_d(d)
    bdv = block_dv(max(dv, bd))  # a listed value tile, never narrower than the q/k tile
    return bd, bdv, dv <= bdv


def tiles(dtype: str, bd: int, bdv: int) -> dict:
    """kernel -> (BLOCK_M, BLOCK_N, num_warps, max_spill_bytes), chosen so that the AOT compile
    for sm_80/sm_90 shows no spills. For dK/dV, BLOCK_M is the inner (query) loop's tile.

    fp32 runs IEEE (non-tensor-core) dots, whose operands need far more registers: smaller tiles.
    Some fp32 configs spill a few dozen bytes whatever the tile (budget 128 B): fp32 is the
    accuracy path (no tensor cores), bf16/fp16 the fast one.
    """
    if dtype == "fp32":
        if bdv <= 32:
            return dict(fwd=(32, 32, 4, 0), dq=(32, 32, 4, 128), dkdv=(32, 32, 4, 128))
        return dict(fwd=(16, 32, 8, 128), dq=(16, 32, 8, 128), dkdv=(16, 32, 8, 128))
    if bdv <= 32:
        return dict(fwd=(64, 64, 4, 0), dq=(64, 64, 4, 0), dkdv=(32, 64, 4, 0))
    if bd <= 32:  # dK/dV: ptxas spills 48-56 B here at any tile tried (32x32, 32x64, 16x64; 4/8 warps)
        return dict(fwd=(64, 64, 8, 0), dq=(32, 32, 8, 0), dkdv=(32, 32, 8, 64))
    return dict(fwd=(32, 32, 8, 0), dq=(32, 32, 8, 0), dkdv=(32, 32, 8, 0))


def _batch3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _gamma32(gamma, like):
    if gamma is None:
        return torch.ones(1, device=like.device, dtype=torch.float32)
    return gamma.reshape(1).to(torch.float32)


MAX_GRID_Y = 65535  # CUDA limit of grid axis 1, which carries the batch (x heads) here


def _batch_slices(B: int):
    for b0 in range(0, B, MAX_GRID_Y):
        yield slice(b0, min(B, b0 + MAX_GRID_Y))


def _sl(t, bs):
    return None if t is None else t[bs]


def attention_fwd(q, k, v, x, gamma, scale: float, out, o, lse):
    """``_attention_fwd`` over batch slices of at most ``MAX_GRID_Y`` (views: no copies)."""
    for bs in _batch_slices(q.shape[0]):
        _attention_fwd(q[bs], k[bs], v[bs], _sl(x, bs), gamma, scale, out[bs], _sl(o, bs), lse[bs])
    return out, o, lse


def attention_bwd(grad, q, k, v, o, lse, gamma, scale: float, dq, dk, dv, r):
    """``_attention_bwd`` over batch slices of at most ``MAX_GRID_Y`` (views: no copies)."""
    for bs in _batch_slices(q.shape[0]):
        _attention_bwd(grad[bs], q[bs], k[bs], v[bs], o[bs], lse[bs], gamma, scale, dq[bs], dk[bs], dv[bs], r[bs])
    return dq, dk, dv, r


def _attention_fwd(q, k, v, x, gamma, scale: float, out, o, lse):
    """Write the attention (and, with ``x``, ``gamma * o + x``) into the preallocated buffers.

    ``out``: (B, DV, NQ) in the input dtype; ``o``: (B, DV, NQ) fp32 copy of the attention output
    (saved for the backward) or None; ``lse``: (B, NQ) fp32. ``x``/``gamma`` None: no residual,
    ``out`` receives the attention output.
    """
    B, D, NQ = q.shape
    NK, DV = k.shape[2], v.shape[1]
    if B == 0 or NQ == 0:
        return out, o, lse
    residual = x is not None
    store_o = o is not None
    bd, bdv, _ = blocks(D, DV)
    bm, bn, warps, _ = tiles(DTYPES[q.dtype], bd, bdv)["fwd"]
    grid = (triton.cdiv(NQ, bm), B, triton.cdiv(DV, bdv))
    xs = _batch3(x) if residual else (0, 0, 0)
    _fwd_kernel[grid](
        q, k, v, x if residual else out, _gamma32(gamma, q), out, o if store_o else lse, lse,
        float(scale), NQ, NK, D, DV, *_batch3(q), *_batch3(k), *_batch3(v), *xs, *_batch3(out),
        *(_batch3(o) if store_o else (0, 0, 0)), lse.stride(0), int(residual), int(store_o), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        BLOCK_DV=bdv, PREC=_prec(q.dtype), num_warps=warps, num_stages=NUM_STAGES)
    return out, o, lse


def _attention_bwd(grad, q, k, v, o, lse, gamma, scale: float, dq, dk, dv, r):
    """Write dq, dk, dv and ``r = rowsum(grad * o)`` ((B, NQ) fp32, contiguous like ``lse``).

    ``grad`` is d(loss)/d(out); with ``gamma`` the attention's own gradient is ``gamma * grad``
    (None: gamma = 1, no residual).
    """
    B, D, NQ = q.shape
    NK, DV = k.shape[2], v.shape[1]
    if B == 0:
        return dq, dk, dv, r
    bd, bdv, one_dv = blocks(D, DV)
    g32 = _gamma32(gamma, q)
    t = tiles(DTYPES[q.dtype], bd, bdv)
    common = dict(BLOCK_D=bd, BLOCK_DV=bdv, ONE_DV=one_dv, PREC=_prec(q.dtype), num_stages=NUM_STAGES)
    if NQ:
        _bwd_rowsum_kernel[(triton.cdiv(NQ, ROWSUM_BLOCK_M), B)](
            grad, o, r, NQ, DV, *_batch3(grad), *_batch3(o), r.stride(0),
            BLOCK_M=ROWSUM_BLOCK_M, BLOCK_DV=ROWSUM_BLOCK_C, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if NK:
        bm, bn, warps, _ = t["dkdv"]
        _bwd_dkdv_kernel[(triton.cdiv(NK, bn), B, triton.cdiv(DV, bdv))](
            q, k, v, grad, lse, r, g32, dk, dv, float(scale), NQ, NK, D, DV,
            *_batch3(q), *_batch3(k), *_batch3(v), *_batch3(grad), lse.stride(0),
            *_batch3(dk), *_batch3(dv), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **common)
    if NQ:
        bm, bn, warps, _ = t["dq"]
        _bwd_dq_kernel[(triton.cdiv(NQ, bm), B)](
            q, k, v, grad, lse, r, g32, dq, float(scale), NQ, NK, D, DV,
            *_batch3(q), *_batch3(k), *_batch3(v), *_batch3(grad), lse.stride(0),
            *_batch3(dq), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **common)
    return dq, dk, dv, r


def aot_configs() -> list:
    """Every configuration the launchers can pick: dtype x ``blocks(d, dv)`` x ``tiles(...)``."""
    configs = []

    def add(name, kernel, ptrs, ce, tile=None):
        bm, bn, warps, spill = tile if tile else (ROWSUM_BLOCK_M, None, NUM_WARPS, 0)
        ce = dict(ce, BLOCK_M=bm) if bn is None else dict(ce, BLOCK_M=bm, BLOCK_N=bn)
        configs.append(KernelConfig(
            name=name, kernel=kernel, constexprs=ce, num_warps=warps, num_stages=NUM_STAGES,
            max_spill_bytes=spill, signature=signature(kernel, ptrs=ptrs, scalars={"scale": "fp32"} if bn else None,
                                                       constexprs=ce)))

    for dt in DTYPES.values():
        prec = "ieee" if dt == "fp32" else "tf32"
        add(f"self_attention.bwd_rowsum[{dt}]", _bwd_rowsum_kernel,
            {"g_ptr": dt, "o_ptr": "fp32", "r_ptr": "fp32"}, {"BLOCK_DV": ROWSUM_BLOCK_C})
        for bdv in BLOCK_DVS:
            for bd in (b for b in BLOCK_DS if b <= bdv):
                t = tiles(dt, bd, bdv)
                ce = {"BLOCK_D": bd, "BLOCK_DV": bdv, "PREC": prec}
                ptrs = {p: dt for p in ("q_ptr", "k_ptr", "v_ptr", "x_ptr", "out_ptr")}
                ptrs.update(gamma_ptr="fp32", lse_ptr="fp32", o_ptr="fp32")
                add(f"self_attention.fwd[{dt},D={bd},DV={bdv}]", _fwd_kernel, ptrs, ce, t["fwd"])
                for one_dv in ((True, False) if bdv == MAX_DV else (True,)):
                    ce = {"BLOCK_D": bd, "BLOCK_DV": bdv, "ONE_DV": one_dv, "PREC": prec}
                    tag = f"{dt},D={bd},DV={bdv},one_dv={int(one_dv)}"
                    common = {p: dt for p in ("q_ptr", "k_ptr", "v_ptr", "g_ptr")}
                    common.update(lse_ptr="fp32", r_ptr="fp32", gamma_ptr="fp32")
                    add(f"self_attention.bwd_dkdv[{tag}]", _bwd_dkdv_kernel, dict(common, dk_ptr=dt, dv_ptr=dt),
                        ce, t["dkdv"])
                    add(f"self_attention.bwd_dq[{tag}]", _bwd_dq_kernel, dict(common, dq_ptr=dt), ce, t["dq"])
    return configs
