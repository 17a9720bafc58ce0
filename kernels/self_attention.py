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

- ``_bwd_rowsum_kernel``: ``r = rowsum(dout * o)`` (fp32) for ``dgamma = sum(r)``, and the softmax
  backward's row term ``delta = rowsum(dO * o)`` (``dO = gamma * dout``).
- ``_bwd_dkdv_kernel``: one program per key block, looping over query blocks: ``dV`` and ``dK``.
- ``_bwd_dq_kernel``: one program per query block, looping over key blocks: ``dQ``.

A finite nonzero ``gamma`` is folded in at the end (``dV = gamma * P^T dout`` etc., with ``delta = r``),
so ``gamma * dout`` is never formed. A gamma of 0, inf or NaN instead multiplies each product with
``dout`` (``_gamma_pair``), so the sums see ``dO = gamma * dout`` as eager's
do: +inf and -inf terms give NaN, as in eager, not ``inf * (finite sum)``. The forward's online softmax
shifts by 0 while a row's maximum is still -inf, so -inf scores give probability 0 and only an all -inf
row is NaN (eager softmax's results). Value channels beyond ``BLOCK_DV`` are split over the grid's third axis; every such
program recomputes the scores, and the ``dP = dout^T v`` contraction loops over all channels in
``BLOCK_C`` chunks (only the first channel tile's dK/dV program does it, for dK).
The query/key dim is one padded tile (``BLOCK_D`` <= ``MAX_D``); larger D is the caller's
business (``attnfast.ops.self_attention`` uses its chunked PyTorch path there).

Tiles (``tiles``): 16-bit programs own 128 rows on 8 warps, 16 per warp, so no warp repeats
another's rows and every measured triton emits wgmma on sm_90 (mma.sync on sm_80); fp32 runs IEEE
dots on FMA units with small tiles. Addresses are formed as ``base + (row * s_r + col * s_c)``: one
32-bit offset per element, added to the pointer at the load or store, rather than a 64-bit pointer
per element kept live across the loop (any stride is allowed: a launch with unit inner strides gets
a vectorizing build, any other an element-by-element one; both are compiled and checked).
Launches run under ``on_device(q)`` (the tensor's CUDA device is current).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import DTYPES, dot_precision, dot_precisions, on_device  # noqa: F401 (DTYPES: the one table, read here by tests)
BLOCK_DS = (16, 32, 64, 128)  # padded query/key dims
BLOCK_DVS = (32, 128)  # padded value-channel tile (more channels: grid split)
MAX_D = BLOCK_DS[-1]
MAX_DV = BLOCK_DVS[-1]
ROWSUM_BLOCK_M = 64
ROWSUM_BLOCK_C = 32  # channel chunk of the rowsum loop (fp32 o: larger chunks spill)
NUM_WARPS = 4
NUM_STAGES = 2


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def block_dv(dv: int) -> int:
    return next(b for b in BLOCK_DVS if b >= min(dv, MAX_DV))


def supported(d: int) -> bool:
    """Whether the kernels take this query/key dim (one padded tile)."""
    return d <= MAX_D


@triton.jit
def _load_tile(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c, other):
    """Load a (len(offs_r), len(offs_c)) tile ``ptr[r * s_r + c * s_c]`` masked to (n_r, n_c). The
    offsets are summed before the pointer add: a pointer per element would be hoisted out of the
    caller's loop and kept live (64 bits each), which made 16-bit tiles spill."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(ptr + (offs_r[:, None] * s_r + offs_c[None, :] * s_c), mask=mask, other=other)


@triton.jit
def _load_scaled(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c, f):
    """``_load_tile`` times the factor ``f``, in the storage dtype, 0 in the masked lanes (their zero padding
    times an infinite ``f`` would be NaN, and the dots would carry it into real elements)."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    x = tl.load(ptr + (offs_r[:, None] * s_r + offs_c[None, :] * s_c), mask=mask, other=0.0)
    return tl.where(mask, x * f, 0.0).to(ptr.dtype.element_ty)


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
        # rows whose scores so far are all -inf shift by 0: exp(-inf - 0) = 0, not exp(-inf + inf) = NaN
        # (a row that is -inf throughout gets l_i = 0, o = 0 / 0 = NaN, as eager softmax gives)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = _load_tile(v_ptr, offs_n, offs_c, svn, svc, NK, DV, 0.0)  # (N, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    mask = (offs_m[:, None] < NQ) & (offs_c[None, :] < DV)
    if store_o != 0:  # fp32 copy of the attention output, for the backward's rowsum(dO * o)
        tl.store(o_ptr + b * sOb + (offs_m[:, None] * sOn + offs_c[None, :] * sOc), o, mask=mask)
    res = o
    if residual != 0:
        g = tl.load(gamma_ptr).to(tl.float32)
        x = tl.load(x_ptr + b * sxb + (offs_m[:, None] * sxn + offs_c[None, :] * sxc), mask=mask,
                    other=0.0).to(tl.float32)
        res = g * o + x
    tl.store(out_ptr + b * sob + (offs_m[:, None] * son + offs_c[None, :] * soc),
             res.to(out_ptr.dtype.element_ty), mask=mask)
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
    # r holds each row's factor of dout on entry (``attention_bwd``: 1, or gamma where it multiplies dout
    # before the sums, as eager's dO = gamma * dout): r = rowsum((factor * dout) * o)
    f = tl.load(r_ptr + b * srb + offs_m, mask=offs_m < NQ, other=0.0)
    r = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, DV, BLOCK_DV):
        offs_c = c0 + offs_c0
        g = _load_tile(g_ptr + b * sgb, offs_m, offs_c, sgn, sgc, NQ, DV, 0.0).to(tl.float32)
        o = _load_tile(o_ptr + b * sob, offs_m, offs_c, son, soc, NQ, DV, 0.0).to(tl.float32)
        r += tl.sum(tl.where(offs_c[None, :] < DV, g * f[:, None], 0.0) * o, 1)  # padding: 0, not 0 * inf
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
                     BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, ONE_DV: tl.constexpr,
                     PREC: tl.constexpr):
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
    # gamma_ptr = [g_post, g_pre] (_gamma_pair): each product with dout also takes
    # g_pre (on its other operand: the probabilities, V), so dO = g_pre * dout enters the sums as eager forms
    # it; g_post scales the results
    g_pre = tl.load(gamma_ptr + 1)
    k = _load_tile(k_ptr + b * skb, offs_n, offs_d, skn, skd, NK, D, 0.0)  # (N, D)
    v = _load_scaled(v_ptr, offs_n, offs_c, svn, svc, NK, DV, g_pre)  # (N, DV) own channel tile, for dP
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        qt = _load_tile(q_ptr, offs_d, offs_m, sqd, sqn, D, NQ, 0.0)  # (D, M)
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < NQ, other=float("inf"))
        st = tl.dot(k, qt, input_precision=PREC) * scale  # (N, M)
        pt = tl.exp(st - lse[None, :])
        valid = (offs_m[None, :] < NQ) & (offs_n[:, None] < NK)
        pt = tl.where(valid, pt, 0.0)
        gt = _load_tile(g_ptr, offs_c, offs_m, sgc, sgn, DV, NQ, 0.0)  # (DV, M) dout
        dv += tl.dot(tl.where(valid, pt * g_pre, 0.0).to(gt.dtype), tl.trans(gt), input_precision=PREC)
        if ONE_DV:  # one channel tile: this program owns dK
            dk += _dk_step(pt, tl.dot(v, gt, input_precision=PREC), qt, r_ptr, offs_m, NQ, PREC)
        elif pid_c == 0:  # dK needs dP over all DV channels: only the first channel tile computes it
            dpt = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for c0 in range(0, DV, BLOCK_C):
                vc = _load_scaled(v_ptr, offs_n, c0 + tl.arange(0, BLOCK_C), svn, svc, NK, DV, g_pre)
                gc = _load_tile(g_ptr, c0 + tl.arange(0, BLOCK_C), offs_m, sgc, sgn, DV, NQ, 0.0)
                dpt += tl.dot(vc, gc, input_precision=PREC)
            dk += _dk_step(pt, dpt, qt, r_ptr, offs_m, NQ, PREC)
    gm = tl.load(gamma_ptr).to(tl.float32)
    dv_mask = (offs_n[:, None] < NK) & (offs_c[None, :] < DV)
    tl.store(dv_ptr + b * sdvb + (offs_n[:, None] * sdvn + offs_c[None, :] * sdvc),
             (dv * gm).to(dv_ptr.dtype.element_ty), mask=dv_mask)
    if pid_c == 0:
        dk_mask = (offs_n[:, None] < NK) & (offs_d[None, :] < D)
        tl.store(dk_ptr + b * sdkb + (offs_n[:, None] * sdkn + offs_d[None, :] * sdkd),
                 (dk * (gm * scale)).to(dk_ptr.dtype.element_ty), mask=dk_mask)


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, r_ptr, gamma_ptr, dq_ptr,
                   scale, NQ, NK, D, DV,
                   sqb, sqd, sqn, skb, skd, skn, svb, svc, svn, sgb, sgc, sgn, slb,
                   sdqb, sdqd, sdqn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, ONE_DV: tl.constexpr,
                   PREC: tl.constexpr):
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
    g_pre = tl.load(gamma_ptr + 1)  # [g_post, g_pre], as in _bwd_dkdv_kernel
    if ONE_DV:
        g = _load_scaled(g_ptr, offs_m, offs_c0, sgn, sgc, NQ, DV, g_pre)  # (M, DV) dO
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
            for c0 in range(0, DV, BLOCK_C):
                gc = _load_scaled(g_ptr, offs_m, c0 + tl.arange(0, BLOCK_C), sgn, sgc, NQ, DV, g_pre)  # dO
                vc = _load_tile(v_ptr, c0 + tl.arange(0, BLOCK_C), offs_n, svc, svn, DV, NK, 0.0)
                dp += tl.dot(gc, vc, input_precision=PREC)
        ds = p * (dp - r[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    gm = tl.load(gamma_ptr).to(tl.float32)
    mask = (offs_m[:, None] < NQ) & (offs_d[None, :] < D)
    tl.store(dq_ptr + b * sdqb + (offs_m[:, None] * sdqn + offs_d[None, :] * sdqd),
             (dq * (gm * scale)).to(dq_ptr.dtype.element_ty), mask=mask)


# The dots replace eager's fp32 ``bmm``, but the fp32 tiles below are FMA tiles: at them TF32 MMAs would have
# warps repeat one another's rows, so the kernels have IEEE fp32 builds only (``_launch.DOT_KINDS``).
DOT_KIND = "ieee"


def _prec(t: torch.Tensor) -> str:
    return dot_precision(t.dtype, t.device, like=DOT_KIND)


def blocks(d: int, dv: int) -> tuple:
    """(BLOCK_D, BLOCK_DV, ONE_DV) the launchers use for these dims (see ``aot_configs``).

    ``ONE_DV``: the value channels fit one tile, so the backward keeps V's (dK/dV) or dO's (dQ) tile
    for the whole loop. At ``BLOCK_D`` = ``MAX_D`` it is always False: dK and dV then accumulate
    128 + 128 fp32 columns, and streaming dO and V in ``BLOCK_C`` chunks for dP spills least
    (benchmarks/results/kernel_tuning.md)."""
    bd = block_d(d)
    bdv = block_dv(max(dv, bd))  # a listed value tile, never narrower than the q/k tile
    return bd, bdv, dv <= bdv and bd < MAX_D


class Tile(NamedTuple):
    """Launch shape of one kernel (see ``tiles``)."""

    BLOCK_M: int  # query tile: the rows of the forward and dQ programs; dK/dV: its inner loop's step
    BLOCK_N: int  # key tile: the forward's and dQ's inner loop step; dK/dV: the rows of its programs
    num_warps: int
    BLOCK_C: int  # channel chunk of the dP = dO^T V contraction when DV spans several tiles (not ONE_DV)


def tiles(dtype: str, bd: int, bdv: int, one_dv: bool = True) -> dict:
    """kernel -> ``Tile`` for padded dims ``bd`` (q/k) and ``bdv`` (value tile); ``one_dv``: DV fits
    one value tile (else the backward contracts dP in ``BLOCK_C``-channel chunks, see ``blocks``).

    16-bit (tensor cores): every program owns 128 rows on 8 warps (the forward's and dQ's queries,
    dK/dV's keys), 16 rows per warp. Each dot's M is those rows, and both tritons put all warps
    along M for these chained dots (warpsPerCTA [8, 1]): with fewer rows than 16 per warp, warps
    would compute the same rows again (64 rows on 8 warps: twice; 32: four times). On sm_90 this
    is wgmma (``wgmma.mma_async``): each warpgroup of 4 warps takes 64 rows, the B operands
    (K^T, V, dO, Q^T) staged in shared memory; on sm_80 ``mma.sync`` m16n8k16, one 16-row slice
    per warp. 64 rows on 4 warps would do the same work per warp, but each thread then loads twice
    the elements and the forward spilled where 8 warps spill none. (At 4 warps sm_80 also put the
    warps along N, repeating the 16-column dots.)

    The inner tile is what the register budget (255 per thread at 8 warps) leaves: the forward's
    and dQ's key step is 64 at D = 16 or with a 32-channel value tile, else 32; dK/dV steps 32
    queries with a 32-channel value tile, else 16. dP chunks are 32 channels (16 at D >= 64,
    and for dQ at D = 128). Every 16-bit config with D <= 32 (SAGAN up to C = 256, the shipped
    C = 128 included) spills nothing on sm_80 and sm_90 under every measured triton; at D >= 64 no
    tile tried avoids some spill under every triton (budgets: ``attnfast.kernels.aot.budgets``;
    measurements: benchmarks/results/kernel_tuning.md).

    fp32 is the accuracy path: IEEE dots (``input_precision="ieee"``, no tensor cores) on FMA
    units, whose blocked layouts give each output element to one thread (warpsPerCTA [8, 1], [4, 2]
    or [4, 1] over 16-32 rows: no warp repeats rows at these tiles, read from the TTGIR). Its
    operands take far more registers, hence the small tiles.
    """
    bc = bdv if one_dv else 32
    if dtype == "fp32":
        if bdv <= 32:
            return dict(fwd=Tile(32, 32, 4, bdv), dq=Tile(32, 32, 4, bc), dkdv=Tile(32, 32, 4, bc))
        return dict(fwd=Tile(16, 32, 8, bdv), dq=Tile(16, 32, 8, bc), dkdv=Tile(16, 32, 8, bc))
    inner = 64 if bd == 16 or bdv == 32 else 32
    if one_dv:
        dkdv = Tile(32 if bdv == 32 else 16, 128, 8, bdv)
    else:
        dkdv = Tile(16, 128, 8, 32 if bd <= 32 else 16)
    return dict(fwd=Tile(128, inner, 8, bdv), dq=Tile(128, inner, 8, 16 if bd == MAX_D else bc), dkdv=dkdv)


def _batch3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _gamma32(gamma, like):
    if gamma is None:
        return torch.ones(1, device=like.device, dtype=torch.float32)
    return gamma.reshape(1).to(torch.float32)


def _gamma_pair(gamma, like):
    """The backward's ``[g_post, g_pre]`` fp32 (2,), chosen on the device (no host sync): a finite nonzero
    gamma scales the results (``[gamma, 1]``); 0, inf or NaN scales each product with dout (``[1, gamma]``),
    as eager's dO = gamma * dout. The PyTorch paths decide alike (``attnfast.ops.self_attention``)."""
    g = _gamma32(gamma, like)
    post = torch.isfinite(g) & (g != 0)
    return torch.cat([torch.where(post, g, 1.0), torch.where(post, 1.0, g)])


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
    prec = _prec(q)
    t = tiles(DTYPES[q.dtype], bd, bdv)["fwd"]
    grid = (triton.cdiv(NQ, t.BLOCK_M), B, triton.cdiv(DV, bdv))
    xs = _batch3(x) if residual else (0, 0, 0)
    with on_device(q):
        _fwd_kernel[grid](
            q, k, v, x if residual else out, _gamma32(gamma, q), out, o if store_o else lse, lse,
            float(scale), NQ, NK, D, DV, *_batch3(q), *_batch3(k), *_batch3(v), *xs, *_batch3(out),
            *(_batch3(o) if store_o else (0, 0, 0)), lse.stride(0), int(residual), int(store_o),
            BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_D=bd, BLOCK_DV=bdv, PREC=prec,
            num_warps=t.num_warps, num_stages=NUM_STAGES)
    return out, o, lse


def _rowsum(grad, o, out):
    """``out = rowsum((out * grad) * o)`` over the value channels: ``out`` (B, NQ) holds each row's factor."""
    B, DV, NQ = grad.shape
    _bwd_rowsum_kernel[(triton.cdiv(NQ, ROWSUM_BLOCK_M), B)](
        grad, o, out, NQ, DV, *_batch3(grad), *_batch3(o), out.stride(0),
        BLOCK_M=ROWSUM_BLOCK_M, BLOCK_DV=ROWSUM_BLOCK_C, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


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
    g32 = _gamma_pair(gamma, q)
    # r (for dgamma) = rowsum(dout * o); delta, the softmax backward's row term, = rowsum(dO * o) with
    # dO = g_pre * dout (r itself without gamma)
    delta = r if gamma is None else torch.empty_like(r)
    prec = _prec(q)
    t = tiles(DTYPES[q.dtype], bd, bdv, one_dv)
    common = dict(BLOCK_D=bd, BLOCK_DV=bdv, ONE_DV=one_dv, PREC=prec, num_stages=NUM_STAGES)
    with on_device(q):
        if NQ:
            r.fill_(1.0)  # the factor of dout in each row's sum
            _rowsum(grad, o, r)
            if delta is not r:
                delta.copy_(g32[1].expand_as(delta))
                _rowsum(grad, o, delta)
        if NK:
            tk = t["dkdv"]
            _bwd_dkdv_kernel[(triton.cdiv(NK, tk.BLOCK_N), B, triton.cdiv(DV, bdv))](
                q, k, v, grad, lse, delta, g32, dk, dv, float(scale), NQ, NK, D, DV,
                *_batch3(q), *_batch3(k), *_batch3(v), *_batch3(grad), lse.stride(0),
                *_batch3(dk), *_batch3(dv), BLOCK_M=tk.BLOCK_M, BLOCK_N=tk.BLOCK_N, BLOCK_C=tk.BLOCK_C,
                num_warps=tk.num_warps, **common)
        if NQ:
            tq = t["dq"]
            _bwd_dq_kernel[(triton.cdiv(NQ, tq.BLOCK_M), B)](
                q, k, v, grad, lse, delta, g32, dq, float(scale), NQ, NK, D, DV,
                *_batch3(q), *_batch3(k), *_batch3(v), *_batch3(grad), lse.stride(0),
                *_batch3(dq), BLOCK_M=tq.BLOCK_M, BLOCK_N=tq.BLOCK_N, BLOCK_C=tq.BLOCK_C,
                num_warps=tq.num_warps, **common)
    return dq, dk, dv, r


def aot_configs() -> list:
    """Every configuration the launchers can pick: dtype x ``blocks(d, dv)`` x ``tiles(...)``."""
    from .aot.registry import KernelConfig, signature

    configs = []

    def add(name, kernel, ptrs, ce, warps, scalars=None):
        configs.append(KernelConfig(
            name=name, kernel=kernel, constexprs=ce, num_warps=warps, num_stages=NUM_STAGES,
            signature=signature(kernel, ptrs=ptrs, scalars=scalars, constexprs=ce)))

    def add_tile(name, kernel, ptrs, ce, tile: Tile):
        ce = dict(ce, BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N)
        add(name, kernel, ptrs, ce, tile.num_warps, {"scale": "fp32"})

    for dtype, dt in DTYPES.items():
        add(f"self_attention.bwd_rowsum[{dt}]", _bwd_rowsum_kernel, {"g_ptr": dt, "o_ptr": "fp32", "r_ptr": "fp32"},
            {"BLOCK_M": ROWSUM_BLOCK_M, "BLOCK_DV": ROWSUM_BLOCK_C}, NUM_WARPS)
        for prec in dot_precisions(dtype, DOT_KIND):
            dtag = dt if prec == "ieee" else f"{dt},{prec}"  # IEEE builds keep their names (budgets, evidence)
            for bdv in BLOCK_DVS:
                for bd in (b for b in BLOCK_DS if b <= bdv):
                    ce = {"BLOCK_D": bd, "BLOCK_DV": bdv, "PREC": prec}
                    ptrs = {p: dt for p in ("q_ptr", "k_ptr", "v_ptr", "x_ptr", "out_ptr")}
                    ptrs.update(gamma_ptr="fp32", lse_ptr="fp32", o_ptr="fp32")
                    add_tile(f"self_attention.fwd[{dtag},D={bd},DV={bdv}]", _fwd_kernel, ptrs, ce,
                             tiles(dt, bd, bdv)["fwd"])
                    for one_dv in ((False,) if bd == MAX_D else (True, False) if bdv == MAX_DV else (True,)):
                        t = tiles(dt, bd, bdv, one_dv)
                        tag = f"{dtag},D={bd},DV={bdv},one_dv={int(one_dv)}"
                        common = {p: dt for p in ("q_ptr", "k_ptr", "v_ptr", "g_ptr")}
                        common.update(lse_ptr="fp32", r_ptr="fp32", gamma_ptr="fp32")
                        for kind, kernel, out in (("dkdv", _bwd_dkdv_kernel, dict(dk_ptr=dt, dv_ptr=dt)),
                                                  ("dq", _bwd_dq_kernel, dict(dq_ptr=dt))):
                            ce = {"BLOCK_D": bd, "BLOCK_DV": bdv, "BLOCK_C": t[kind].BLOCK_C, "ONE_DV": one_dv,
                                  "PREC": prec}
                            add_tile(f"self_attention.bwd_{kind}[{tag}]", kernel, dict(common, **out), ce, t[kind])
    return configs
