"""Fused grid attention ("Learn to Pay Attention" / AttnMel): Triton forward and backward.

Per sample ``b`` and pixel ``p`` of the local map ``l`` (C channels, H x W)::

    z_p = W_l l_p + up(Gp)_p        Gp = W_g g at g's low resolution (computed by the caller)
    c_p = phi . relu(z_p) + bias    (logit)
    softmax mode: a = softmax_p(c),  pooled = sum_p a_p l_p
    sigmoid mode: a = sigmoid(c),    pooled = mean_p a_p l_p

``up`` is bilinear upsampling (align_corners=False, edge clamping exactly like ``F.interpolate``),
taken on the fly from four taps of ``Gp`` stored as (B, h, w, A) fp32. No A x H x W tensor ever
goes to global memory: ``z`` lives in registers one (BLOCK_P pixels x BLOCK_A channels) chunk at a
time, built by ``tl.dot`` over chunks of C.

Kernels
- ``grid_fwd_kernel`` (grid B x NSPLIT, flash-decoding split of H*W): writes the fp32 logits and, per
  split, the online-softmax partials (max, sum, acc[C] = sum exp(c - max) l). ``acc`` is kept in a
  program-private fp32 row of global memory, rescaled and updated once per pixel tile right after
  the tile's ``l`` was read for ``z`` (so that re-read hits cache); l is read once from HBM.
  The row is zeroed first, then a barrier: the read-modify-writes may run on other threads than
  the zeroing stores.
- ``grid_combine_kernel`` (grid B): merges the partials into lse (log-sum-exp), pooled (fp32 and
  output dtype) and writes ``a``.
- ``grid_bwd_kernel`` (grid B x NSPLIT): recomputes z from l, computes ``dc`` per pixel (stored,
  B x H*W fp32), ``dl = s a dpooled + W_l^T dz`` and accumulates the adjoint of the bilinear
  upsampling into a low-resolution fp32 buffer dGp (B, h, w, A) with relaxed atomics (pure
  accumulation, read by the next launch only: no ordering, no fence in the pixel loop).
- ``grid_bwd_weight_kernel`` (grid A-blocks x C-blocks x NSPLIT over all B*H*W pixels): recomputes
  z for its block of A channels, and accumulates dW_l (BLOCK_A2 x BLOCK_C2) and dphi in registers
  over its range of pixels, written once per program as a per-split fp32 partial; the caller sums
  the (few) partials. Deterministic: no atomics on the weight gradients.

Launch shape: the split counts (NSPLIT) come from the compiled kernel's occupancy on the device
(``splits_for``, ``compiled_resident_blocks``): resident blocks per SM from its registers, shared
memory and warps (``_launch.blocks_per_sm``) times the SM count make one wave. Launches run under
the tensor's device (``_launch.on_device``), so ``cuda:1`` works without ``set_device``.

Statistics and accumulation are fp32 whatever the storage dtype; fp32 inputs use TF32 dots exactly
when eager fp32 1x1 convolutions would use TF32 (``precision_for``), IEEE fp32 dots otherwise. All
inputs are read through their strides (NCHW, channels_last, stride-0 gradients).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import (  # noqa: F401 (re-exported: the split logic's names, as the tests and tools read them)
    DTYPES, INTERPRETER_PROGRAMS, PROGRAM_OVERHEAD_TILES, RESIDENT, blocks_per_sm, compiled_resident_blocks,
    compute_capability, conv_tf32_allowed, dot_precision, dot_precisions, on_device, resident_blocks, split_time,
    splits, splits_for, w2d)

_RESIDENT = RESIDENT  # the occupancy cache ``_splits`` uses (the shared one; tests swap in their own)
_precisions = functools.partial(dot_precisions, like="conv")
MAX_ATTN_FEATURES = 512  # larger A -> PyTorch path (configs are compiled and checked up to 512)
BLOCK_S = 64  # most splits of H*W per sample (the combine reads them as one vector)
COMBINE_BLOCK_C = 64
COMBINE_BLOCK_HW = 256
BLOCK_A2 = 32  # weight-gradient kernel: A channels per program


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pixel_coords(pix, W):
    y = pix // W
    x = pix - y * W
    return y, x


@triton.jit
def _src_index(dst, inv_up, n_in):
    # PyTorch's area_pixel_compute_source_index (align_corners=False) + upsample_bilinear2d taps.
    src = tl.maximum((dst.to(tl.float32) + 0.5) * inv_up - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i0 = tl.minimum(i0, n_in - 1)
    lam1 = src - i0.to(tl.float32)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, lam1


@triton.jit
def _tap(k, y0, y1, ly1, x0, x1, lx1):
    """Tap ``k`` (0..3: (y0, x0), (y0, x1), (y1, x0), (y1, x1)) of the bilinear stencil: its
    low-res row and column (P,) and weight (P,) fp32."""
    yk = tl.where(k >= 2, y1, y0)
    ly = tl.where(k >= 2, ly1, 1.0 - ly1)
    xk = tl.where((k % 2) == 1, x1, x0)
    lx = tl.where((k % 2) == 1, lx1, 1.0 - lx1)
    return yk, xk, ly * lx


@triton.jit
def _upsampled_gp(gp_b, y, x, a0, mask2, inv_up, h, w, A, BLOCK_A: tl.constexpr):
    """Bilinear tap of Gp (B, h, w, A) fp32 at high-res pixels (y, x), channels a0 + [0, BLOCK_A):
    a (P, BLOCK_A) fp32 tile.

    ``gp_b`` points at this sample's Gp (h, w, A); offsets inside a sample are int32. The four taps
    run as a loop (not unrolled), so that one tap's (P, BLOCK_A) address tile is live at a time."""
    y0, y1, ly1 = _src_index(y, inv_up, h)
    x0, x1, lx1 = _src_index(x, inv_up, w)
    a2 = tl.arange(0, BLOCK_A)[None, :]
    up = tl.zeros(mask2.shape, dtype=tl.float32)
    for k in range(4):
        yk, xk, wk = _tap(k, y0, y1, ly1, x0, x1, lx1)
        g = tl.load(gp_b + ((yk * w + xk) * A + a0)[:, None] + a2, mask=mask2, other=0.0)
        up += wk[:, None] * g
    return up


@triton.jit
def _scatter_gp(dgp_b, y, x, a0, mask2, dz, inv_up, h, w, A, BLOCK_A: tl.constexpr):
    """Adjoint of ``_upsampled_gp``: atomically add the four weighted taps of dz into dGp.

    Relaxed atomics: pure accumulation, nothing is read back in this kernel (the default acq_rel
    would put a GPU-wide fence in the pixel loop); the end of the kernel orders them for the next
    launch."""
    y0, y1, ly1 = _src_index(y, inv_up, h)
    x0, x1, lx1 = _src_index(x, inv_up, w)
    a2 = tl.arange(0, BLOCK_A)[None, :]
    for k in range(4):
        yk, xk, wk = _tap(k, y0, y1, ly1, x0, x1, lx1)
        tl.atomic_add(dgp_b + ((yk * w + xk) * A + a0)[:, None] + a2, dz * wk[:, None], mask=mask2,
                      sem="relaxed")


@triton.jit
def _split_tiles(sp, n_tiles, tiles_per_split):
    """Range of tiles [begin, end) owned by split ``sp``."""
    t_begin = sp * tiles_per_split
    return t_begin, tl.minimum(t_begin + tiles_per_split, n_tiles)


@triton.jit
def _load_phi(phi_ptr, offs_a, A, sphi):
    mask_a = offs_a < A
    return tl.load(phi_ptr + offs_a * sphi, mask=mask_a, other=0.0).to(tl.float32), mask_a


@triton.jit
def _relu(z):
    """``max(z, 0)`` keeping NaN, as eager relu does (``tl.maximum``'s default drops it)."""
    return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_grad(z, g):
    """Eager relu's backward (``threshold_backward`` on ``relu(z)``): ``g`` where z > 0 and where z is
    NaN, 0 where z <= 0."""
    return tl.where(z <= 0.0, 0.0, g)


@triton.jit
def _unpadded(z, mask):
    """``z`` with its masked lanes 0: there the zero padding of l or W_l may have met an infinite W_l or l
    (0 * inf = NaN), which relu, its gradient and the dots over A or the pixels would carry into real
    elements."""
    return tl.where(mask, z, 0.0)


@triton.jit
def _tile_pixels(t, HW, W, BLOCK_P: tl.constexpr):
    """Pixel indices of tile ``t`` of one sample (masked lanes clamped to pixel 0) and (y, x)."""
    pix = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = pix < HW
    pix = tl.where(mask_p, pix, 0)
    y, x = _pixel_coords(pix, W)
    return pix, mask_p, y, x


@triton.jit
def _project_l(l_b, row_off, mask_p, wl_ptr, offs_a, mask_a, C, sl_c, swl_a, swl_c, dp_row, sdp_c,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
               PRECISION: tl.constexpr, WITH_GDOT: tl.constexpr):
    """W_l l for a tile: (P, BLOCK_A) fp32; ``l_b`` is this sample's l, ``row_off`` (P,) int32 the
    offset of each pixel's channel 0.

    With WITH_GDOT also returns dpooled . l_p (P,) fp32 (``dp_row``: this sample's dpooled row),
    from the same loads of l."""
    z = tl.zeros((BLOCK_P, BLOCK_A), dtype=tl.float32)
    gdot = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        # c0 enters the per-pixel offsets: no loop-invariant (P, BLOCK_C) offset tile to hoist
        lt = tl.load(l_b + (row_off + c0 * sl_c)[:, None] + tl.arange(0, BLOCK_C)[None, :] * sl_c,
                     mask=(mask_p[:, None] & mask_c[None, :]), other=0.0)
        wt = tl.load(wl_ptr + offs_c[:, None] * swl_c + offs_a[None, :] * swl_a,
                     mask=mask_c[:, None] & mask_a[None, :], other=0.0)
        z = tl.dot(lt, wt, z, input_precision=PRECISION)
        if WITH_GDOT:
            dp = tl.load(dp_row + offs_c * sdp_c, mask=mask_c, other=0.0)
            gdot += tl.sum(lt.to(tl.float32) * dp.to(tl.float32)[None, :], axis=1)
    return z, gdot


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["tiles_per_split", "nsplit"])
def grid_fwd_kernel(l_ptr, gp_ptr, wl_ptr, phi_ptr, bias_ptr, logit_ptr, m_ptr, s_ptr, acc_ptr,
                    C, A, HW, W, h, w, inv_up, tiles_per_split, nsplit, softmax,
                    sl_b, sl_c, sl_h, sl_w, swl_a, swl_c, sphi,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
                    A_CHUNKS: tl.constexpr, PRECISION: tl.constexpr):
    """``BLOCK_A`` is a chunk of the A channels (A_CHUNKS * BLOCK_A >= A, a runtime loop): c = sum over
    chunks of phi . relu(z[:, chunk]), so only a BLOCK_P x BLOCK_A slice of z is live at a time
    (re-reads of the l tile hit cache)."""
    b = tl.program_id(0)
    sp = tl.program_id(1)
    b64 = b.to(tl.int64)
    bias = tl.load(bias_ptr).to(tl.float32)
    acc_row = acc_ptr + (b64 * nsplit + sp) * C
    for c0 in range(0, C, BLOCK_C):  # zero this program's pooled partial
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tl.store(acc_row + offs_c, tl.zeros((BLOCK_C,), dtype=tl.float32), mask=offs_c < C)
    tl.debug_barrier()  # the zeros are visible to every thread before the first read-modify-write
    gp_b = gp_ptr + b64 * h * w * A
    l_b = l_ptr + b64 * sl_b
    m_run = tl.max(tl.full((BLOCK_P,), float("-inf"), tl.float32), axis=0)
    s_run = tl.sum(tl.zeros((BLOCK_P,), dtype=tl.float32), axis=0)
    t_begin, t_end = _split_tiles(sp, tl.cdiv(HW, BLOCK_P), tiles_per_split)
    for t in range(t_begin, t_end):
        pix, mask_p, y, x = _tile_pixels(t, HW, W, BLOCK_P)
        row_off = y * sl_h + x * sl_w
        c = tl.zeros((BLOCK_P,), dtype=tl.float32) + bias
        for ia in range(A_CHUNKS):  # a runtime loop: one chunk live at a time
            a0 = ia * BLOCK_A
            offs_a = a0 + tl.arange(0, BLOCK_A)
            phi, mask_a = _load_phi(phi_ptr, offs_a, A, sphi)
            z, _ = _project_l(l_b, row_off, mask_p, wl_ptr, offs_a, mask_a, C, sl_c, swl_a, swl_c, l_ptr, 0,
                              BLOCK_P, BLOCK_C, BLOCK_A, PRECISION, False)
            mask2 = mask_p[:, None] & mask_a[None, :]
            z = _unpadded(z + _upsampled_gp(gp_b, y, x, a0, mask2, inv_up, h, w, A, BLOCK_A), mask_a[None, :])
            c += tl.sum(_relu(z) * phi[None, :], axis=1)
        tl.store(logit_ptr + b64 * HW + pix, c, mask=mask_p)
        if softmax != 0:
            m_new = tl.maximum(m_run, tl.max(tl.where(mask_p, c, float("-inf")), axis=0))
            # while every logit so far is -inf, shift by 0: exp(-inf - 0) = 0, not exp(-inf + inf) = NaN
            # (a row that is -inf throughout still gets NaN, from the combine, as eager softmax gives)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_run - m_ref)
            p = tl.where(mask_p, tl.exp(c - m_ref), 0.0)
            s_run = s_run * alpha + tl.sum(p, axis=0)
            m_run = m_new
        else:
            alpha = s_run * 0.0 + 1.0  # s_run stays 0 (finite) in sigmoid mode
            p = tl.where(mask_p, tl.sigmoid(c), 0.0)
        for c0 in range(0, C, BLOCK_C):  # acc = acc * alpha + sum_p p l_p   (l tile is cache-hot)
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            lt = tl.load(l_b + row_off[:, None] + offs_c[None, :] * sl_c,
                         mask=mask_p[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            contrib = tl.sum(p[:, None] * lt, axis=0)
            old = tl.load(acc_row + offs_c, mask=mask_c, other=0.0)
            tl.store(acc_row + offs_c, old * alpha + contrib, mask=mask_c)
        tl.debug_barrier()
    tl.store(m_ptr + b64 * nsplit + sp, m_run)
    tl.store(s_ptr + b64 * nsplit + sp, s_run)


@triton.jit(do_not_specialize=["nsplit"])  # the split count depends on the occupancy, the binary must not
def grid_combine_kernel(m_ptr, s_ptr, acc_ptr, logit_ptr, a_ptr, pooled_ptr, pooled32_ptr, lse_ptr,
                        C, HW, nsplit, softmax, inv_hw, sp_b, sp_c,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < nsplit
    if softmax != 0:
        ms = tl.load(m_ptr + b * nsplit + offs_s, mask=mask_s, other=float("-inf"))
        ss = tl.load(s_ptr + b * nsplit + offs_s, mask=mask_s, other=0.0)
        mx = tl.max(ms, axis=0)
        wgt = tl.where(mask_s, tl.exp(ms - mx), 0.0)
        total = tl.sum(ss * wgt, axis=0)
        lse = mx + tl.log(total)
        wgt = wgt / total
    else:
        lse = tl.sum(tl.zeros((BLOCK_S,), dtype=tl.float32), axis=0)
        wgt = tl.where(mask_s, inv_hw, 0.0)
    tl.store(lse_ptr + b, lse)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc = tl.load(acc_ptr + (b * nsplit + offs_s[:, None]) * C + offs_c[None, :],
                      mask=mask_s[:, None] & mask_c[None, :], other=0.0)
        pooled = tl.sum(acc * wgt[:, None], axis=0)
        tl.store(pooled32_ptr + b * C + offs_c, pooled, mask=mask_c)
        tl.store(pooled_ptr + b * sp_b + offs_c * sp_c, pooled.to(pooled_ptr.dtype.element_ty), mask=mask_c)
    for p0 in range(0, HW, BLOCK_HW):
        offs = p0 + tl.arange(0, BLOCK_HW)
        mask = offs < HW
        c = tl.load(logit_ptr + b * HW + offs, mask=mask, other=0.0)
        if softmax != 0:
            a = tl.exp(c - lse)
        else:
            a = tl.sigmoid(c)
        tl.store(a_ptr + b * HW + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_from_logit(c, lse, softmax):
    if softmax != 0:
        a = tl.exp(c - lse)
    else:
        a = tl.sigmoid(c)
    return a


@triton.jit(do_not_specialize=["tiles_per_split", "nsplit"])
def grid_bwd_kernel(l_ptr, gp_ptr, wl_ptr, phi_ptr, logit_ptr, lse_ptr, k_ptr, da_ptr, dp_ptr,
                    dl_ptr, dgp_ptr, dc_ptr, dlacc_ptr,
                    C, A, HW, W, h, w, inv_up, tiles_per_split, nsplit, softmax, scale,
                    sl_b, sl_c, sl_h, sl_w, sdl_b, sdl_c, sdl_h, sdl_w, swl_a, swl_c, sphi,
                    sda_b, sda_h, sda_w, sdp_b, sdp_c,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
                    A_CHUNKS: tl.constexpr, PRECISION: tl.constexpr, DZ_OUT: tl.constexpr):
    """``BLOCK_A`` is a chunk of the A channels (A_CHUNKS * BLOCK_A >= A, a runtime loop; dc does not
    depend on z, so each chunk of dz is independent). dl = s a dpooled + sum over chunks of
    dz[:, chunk] W_l[chunk]; with more than one
    chunk the partial sums go through ``dlacc``, a program-private fp32 (BLOCK_P, C) tile in global
    memory (cache-hot), and the last chunk writes dl.

    ``DZ_OUT`` (deterministic mode): no atomics; dz itself is stored to ``dgp_ptr``, then a (B, H*W, A)
    fp32 buffer, for the caller's fixed-order adjoint of the upsampling (``upsample_adjoint``)."""
    b = tl.program_id(0)
    sp = tl.program_id(1)
    b64 = b.to(tl.int64)
    lse = tl.load(lse_ptr + b64)
    kb = tl.load(k_ptr + b64)
    gp_b = gp_ptr + b64 * h * w * A
    dgp_b = dgp_ptr + b64 * h * w * A
    l_b = l_ptr + b64 * sl_b
    dl_b = dl_ptr + b64 * sdl_b
    dp_b = dp_ptr + b64 * sdp_b
    dlacc = dlacc_ptr + (b64 * nsplit + sp) * BLOCK_P * C
    offs_pl = tl.arange(0, BLOCK_P)
    t_begin, t_end = _split_tiles(sp, tl.cdiv(HW, BLOCK_P), tiles_per_split)
    for t in range(t_begin, t_end):
        pix, mask_p, y, x = _tile_pixels(t, HW, W, BLOCK_P)
        row_off = y * sl_h + x * sl_w
        dl_off = y * sdl_h + x * sdl_w
        c = tl.load(logit_ptr + b64 * HW + pix, mask=mask_p, other=0.0)
        a = _attn_from_logit(c, lse, softmax)
        da = tl.load(da_ptr + b64 * sda_b + y * sda_h + x * sda_w, mask=mask_p, other=0.0).to(tl.float32)
        for ia in range(A_CHUNKS):  # a runtime loop: one chunk live at a time
            a0 = ia * BLOCK_A
            offs_a = a0 + tl.arange(0, BLOCK_A)
            phi, mask_a = _load_phi(phi_ptr, offs_a, A, sphi)
            # z = W_l l (+ taps below) and gdot = dpooled . l_p in the same pass over l
            z, gdot = _project_l(l_b, row_off, mask_p, wl_ptr, offs_a, mask_a, C, sl_c, swl_a, swl_c,
                                 dp_b, sdp_c, BLOCK_P, BLOCK_C, BLOCK_A, PRECISION, True)
            mask2 = mask_p[:, None] & mask_a[None, :]
            z = _unpadded(z + _upsampled_gp(gp_b, y, x, a0, mask2, inv_up, h, w, A, BLOCK_A), mask2)
            ghat = da + scale * gdot
            if softmax != 0:
                dc = a * (ghat - kb)
            else:
                dc = ghat * a * (1.0 - a)
            dc = tl.where(mask_p, dc, 0.0)
            if ia == 0:
                tl.store(dc_ptr + b64 * HW + pix, dc, mask=mask_p)
            dz = _relu_grad(z, dc[:, None] * phi[None, :])
            if DZ_OUT:
                tl.store(dgp_ptr + (b64 * HW + pix)[:, None] * A + offs_a[None, :], dz, mask=mask2)
            else:
                _scatter_gp(dgp_b, y, x, a0, mask2, dz, inv_up, h, w, A, BLOCK_A)
            dz_lp = dz.to(l_ptr.dtype.element_ty)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                mask_pc = mask_p[:, None] & mask_c[None, :]
                wt = tl.load(wl_ptr + offs_a[:, None] * swl_a + offs_c[None, :] * swl_c,
                             mask=mask_a[:, None] & mask_c[None, :], other=0.0)
                dlt = tl.dot(dz_lp, wt, input_precision=PRECISION)
                acc_off = offs_pl[:, None] * C + offs_c[None, :]
                if ia == 0:
                    dp = tl.load(dp_b + offs_c * sdp_c, mask=mask_c, other=0.0)
                    dlt += (scale * a)[:, None] * dp.to(tl.float32)[None, :]
                else:
                    dlt += tl.load(dlacc + acc_off, mask=mask_pc, other=0.0)
                if ia + 1 < A_CHUNKS:
                    tl.store(dlacc + acc_off, dlt, mask=mask_pc)
                else:
                    tl.store(dl_b + dl_off[:, None] + offs_c[None, :] * sdl_c, dlt.to(dl_ptr.dtype.element_ty),
                             mask=mask_pc)
            if A_CHUNKS > 1:
                # dlacc: this chunk's stores before the next chunk's loads, and the last chunk's
                # loads before the next tile's first stores (threads need not own the same elements)
                tl.debug_barrier()


@triton.jit(do_not_specialize=["n_tiles", "tiles_per_split"])  # n_tiles varies with the batch: one binary
def grid_bwd_weight_kernel(l_ptr, gp_ptr, wl_ptr, phi_ptr, dc_ptr, dwl_ptr, dphi_ptr,
                           C, A, HW, W, h, w, inv_up, n_tiles, tiles_per_split,
                           sl_b, sl_c, sl_h, sl_w, swl_a, swl_c, sphi,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A2: tl.constexpr,
                           BLOCK_C2: tl.constexpr, PRECISION: tl.constexpr):
    """Tiles run over (sample, pixel tile) pairs: tile t is pixel tile t % tiles_per_sample of sample
    t // tiles_per_sample, so the sample index is a scalar."""
    pid_a = tl.program_id(0)
    pid_c = tl.program_id(1)
    sp = tl.program_id(2)
    offs_a = pid_a * BLOCK_A2 + tl.arange(0, BLOCK_A2)
    phi, mask_a = _load_phi(phi_ptr, offs_a, A, sphi)
    offs_c2 = pid_c * BLOCK_C2 + tl.arange(0, BLOCK_C2)
    mask_c2 = offs_c2 < C
    acc = tl.zeros((BLOCK_A2, BLOCK_C2), dtype=tl.float32)
    dphi = tl.zeros((BLOCK_A2,), dtype=tl.float32)
    tiles_per_sample = tl.cdiv(HW, BLOCK_P)
    t_begin, t_end = _split_tiles(sp, n_tiles, tiles_per_split)
    for t in range(t_begin, t_end):
        b64 = (t // tiles_per_sample).to(tl.int64)
        pix, mask_p, y, x = _tile_pixels(t % tiles_per_sample, HW, W, BLOCK_P)
        l_b = l_ptr + b64 * sl_b
        row_off = y * sl_h + x * sl_w
        z, _ = _project_l(l_b, row_off, mask_p, wl_ptr, offs_a, mask_a, C, sl_c, swl_a, swl_c, l_ptr, 0,
                          BLOCK_P, BLOCK_C, BLOCK_A2, PRECISION, False)
        mask2 = mask_p[:, None] & mask_a[None, :]
        z += _upsampled_gp(gp_ptr + b64 * h * w * A, y, x, pid_a * BLOCK_A2, mask2, inv_up, h, w, A, BLOCK_A2)
        z = _unpadded(z, mask_p[:, None])  # (masked channels reach only rows of dW_l and dphi not stored)
        dc = tl.load(dc_ptr + b64 * HW + pix, mask=mask_p, other=0.0)
        dphi += tl.sum(dc[:, None] * _relu(z), axis=0)
        dz = _relu_grad(z, dc[:, None] * phi[None, :]).to(l_ptr.dtype.element_ty)
        lt = tl.load(l_b + row_off[:, None] + offs_c2[None, :] * sl_c,
                     mask=mask_p[:, None] & mask_c2[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz), lt, acc, input_precision=PRECISION)
    tl.store(dwl_ptr + (sp.to(tl.int64) * A + offs_a[:, None]) * C + offs_c2[None, :], acc,
             mask=mask_a[:, None] & mask_c2[None, :])
    if pid_c == 0:
        tl.store(dphi_ptr + sp.to(tl.int64) * A + offs_a, dphi, mask=mask_a)


# ----------------------------------------------------------------------------------------------
# launch heuristics and launchers
# ----------------------------------------------------------------------------------------------
# fp32 dots: 1x1 convolutions, so cuDNN's TF32 setting decides (``_launch.dot_precision``).
precision_for = functools.partial(dot_precision, like="conv")


# Tile table of the main kernels, per A bucket (A rounded up to a power of two, >= 16):
# (BLOCK_P, BLOCK_C, BLOCK_A, num_warps), BLOCK_A being the chunk of A channels whose slice of z is
# live at a time (A_CHUNKS = bucket // BLOCK_A chunks, a runtime loop). Rules: spills within the
# budgets (``attnfast.kernels.aot.budgets`` lists every spill measured: a few bytes in some launch
# binaries, where ptxas trades them for occupancy, and in the fp32 deterministic backward), and no
# warp repeats another's MMA rows: every dot's M x N output has at least 16 x 8 elements per warp. The backward's
# dl = dz W_l dot is BLOCK_P x BLOCK_C, so 8 warps need BLOCK_P * BLOCK_C >= 1024 and 4 warps >= 512.
# Chunks of 64 from A = 128 on: the backward's dz is the A operand of the dl = dz W_l dot, and every
# warp holds its full K = BLOCK_A extent (at BLOCK_P = 16 a 16 x 256 bf16 dz is 64 registers per
# thread on its own). More chunks cost re-reads of the (cache-hot) l tile and, in the backward, a dl
# partial per chunk through ``dlacc``; the MMA work is the same. The 16-bit forward from A = 64 on
# takes 32-pixel tiles: every tile re-reads all of W_l (L2), so 32 pixels halve those reads against
# 16 (a traffic model: benchmarks/results/kernel_tuning.md, with the measurements behind the table).
_FWD_TILES = {16: (64, 64, 16, 4), 32: (32, 64, 32, 4), 64: (32, 32, 64, 8), 128: (32, 32, 64, 8),
              256: (32, 32, 64, 8), 512: (32, 32, 64, 8)}
_BWD_TILES = {16: (32, 32, 16, 4), 32: (32, 32, 32, 8), 64: (16, 64, 64, 8), 128: (16, 64, 64, 8),
              256: (16, 64, 64, 8), 512: (16, 64, 64, 8)}
# fp32: BLOCK_C = 16 (the operand tiles of the dots are twice as wide per element), smaller chunks.
# The backward from A = 32 on: wider dl tiles (32 x 16 on 4 warps, 32 x 32 on 8) in one pipeline
# stage (``_BWD_STAGES_FP32``; software-pipelined, the IEEE (FMA) variant spilled).
_FWD_TILES_FP32 = {16: (64, 16, 16, 4), 32: (32, 16, 32, 4), 64: (16, 16, 64, 4), 128: (16, 16, 32, 4),
                   256: (16, 16, 32, 4), 512: (16, 16, 32, 4)}
_BWD_TILES_FP32 = {16: (32, 16, 16, 4), 32: (32, 16, 32, 4), 64: (32, 32, 32, 8), 128: (32, 32, 32, 8),
                   256: (32, 32, 32, 8), 512: (32, 32, 32, 8)}
_BWD_STAGES_FP32 = {32: 1, 64: 1, 128: 1, 256: 1, 512: 1}  # num_stages per A bucket (3 where absent)


def main_blocks(A: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Tile sizes of the forward / backward main kernels: a function of A and the dtype."""
    bucket = max(16, triton.next_power_of_2(A))
    if bucket > MAX_ATTN_FEATURES:
        raise ValueError(f"the fused grid-attention kernels support attn_features <= {MAX_ATTN_FEATURES}; "
                         f"got {A}")
    fp32 = dtype == torch.float32
    if fp32:
        table = _BWD_TILES_FP32 if backward else _FWD_TILES_FP32
    else:
        table = _BWD_TILES if backward else _FWD_TILES
    block_p, block_c, block_a, num_warps = table[bucket]
    num_stages = _BWD_STAGES_FP32.get(bucket, 3) if fp32 and backward else 3
    return {"BLOCK_P": block_p, "BLOCK_C": block_c, "BLOCK_A": block_a, "A_CHUNKS": bucket // block_a,
            "num_warps": num_warps, "num_stages": num_stages}


def weight_blocks(C: int, dtype: torch.dtype, precision: str = "ieee") -> dict:
    """Tile sizes of the weight-gradient kernel: BLOCK_A2 channels of A x BLOCK_C2 of C per program.

    No warp repeats another's MMA rows (z's BLOCK_P x BLOCK_A2 dot needs 16 x 8 outputs per warp):
    16 pixels per tile for 16-bit BLOCK_C2 <= 32 and fp32 BLOCK_C2 = 32 or 128 (4 warps), 32 pixels
    otherwise; 8 warps for fp32 BLOCK_C2 = 64 and for 16-bit from 128 on. fp32 pipeline stages: two at
    BLOCK_C2 = 32, one at 64, and at 128 one with IEEE dots, three with TF32 (``precision``). The
    spill measurements behind these choices are in benchmarks/results/kernel_tuning.md."""
    fp32 = dtype == torch.float32
    block_c2 = min(128 if fp32 else 256, max(16, triton.next_power_of_2(C)))
    small_p = block_c2 in ((32, 128) if fp32 else (16, 32))
    if fp32:
        stages = {32: 2, 64: 1, 128: 3 if precision == "tf32" else 1}.get(block_c2, 3)
    else:
        stages = 3
    return {"BLOCK_P": 16 if small_p else 32, "BLOCK_C": 16 if fp32 else 32,
            "BLOCK_A2": BLOCK_A2, "BLOCK_C2": block_c2,
            "num_warps": (8 if block_c2 == 64 else 4) if fp32 else (8 if block_c2 >= 128 else 4),
            "num_stages": stages}


def _splits(kernel, args: tuple, kw: dict, n_tiles: int, n_outer: int, device: torch.device,
            max_splits: int | None = None):
    """``_launch.splits`` with this module's occupancy cache and capability reader."""
    return splits(kernel, args, kw, n_tiles, n_outer, device, max_splits, cache=_RESIDENT,
                  capability=compute_capability)


def grid_attention_fwd(l, gp, w_l, phi_w, phi_b, up_factor: int, softmax: bool,
                       a, pooled, logits, lse, pooled32):
    """Run the forward. ``gp``: (B, h, w, A) fp32 contiguous. Writes a (B,1,H,W) contiguous,
    pooled (B, C) any strides, logits (B, H*W) fp32, lse (B,) fp32, pooled32 (B, C) fp32."""
    B, C, H, W = l.shape
    h, w = gp.shape[1], gp.shape[2]
    A = gp.shape[3]
    HW = H * W
    wl = w2d(w_l)
    phi = w2d(phi_w)[0]
    cfg = main_blocks(A, l.dtype)
    kw = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], BLOCK_A=cfg["BLOCK_A"], A_CHUNKS=cfg["A_CHUNKS"],
              PRECISION=precision_for(l.dtype, l.device), num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"])

    def args(m, s, acc, per, nsplit):
        return (l, gp, wl, phi, phi_b, logits, m, s, acc, C, A, HW, W, h, w, 1.0 / up_factor, per, nsplit,
                int(softmax), *l.stride(), wl.stride(0), wl.stride(1), phi.stride(0))

    with on_device(l):
        scratch = logits  # fp32 placeholder for the split-sized buffers while the occupancy is read
        nsplit, per = _splits(grid_fwd_kernel, args(scratch, scratch, scratch, 2, 2), kw,
                              triton.cdiv(HW, cfg["BLOCK_P"]), B, l.device, BLOCK_S)
        m = torch.empty((B, nsplit), device=l.device, dtype=torch.float32)
        s = torch.empty_like(m)
        acc = torch.empty((B, nsplit, C), device=l.device, dtype=torch.float32)
        grid_fwd_kernel[(B, nsplit)](*args(m, s, acc, per, nsplit), **kw)
        grid_combine_kernel[(B,)](
            m, s, acc, logits, a, pooled, pooled32, lse, C, HW, nsplit, int(softmax), 1.0 / HW,
            pooled.stride(0), pooled.stride(1),
            BLOCK_S=BLOCK_S, BLOCK_C=COMBINE_BLOCK_C, BLOCK_HW=COMBINE_BLOCK_HW, num_warps=4)


def grid_attention_bwd(l, gp, w_l, phi_w, logits, lse, kvec, da, dpooled, up_factor: int, softmax: bool,
                       dl, dgp, dc, deterministic: bool | None = None):
    """Main backward: writes dl (strided like ``dl``), dc (B, H*W) fp32 and accumulates into
    ``dgp`` (B, h, w, A) fp32, which must be zero on entry. ``da``: (B, 1, H, W) any strides
    (stride 0 ok); ``dpooled``: (B, C) any strides; ``kvec``: (B,) fp32 = sum_q a_q ghat_q.

    ``deterministic`` (None: ``torch.are_deterministic_algorithms_enabled()``): no atomics, bitwise
    reproducible. The kernel stores dz (B, H*W, A) fp32 instead
    of scattering it into dgp with atomics (their order varies from run to run), and
    ``upsample_adjoint`` reduces it in a fixed order (two matmuls): an A x H x W fp32 buffer, what
    the atomic path never allocates."""
    B, C, H, W = l.shape
    h, w, A = gp.shape[1], gp.shape[2], gp.shape[3]
    HW = H * W
    wl = w2d(w_l)
    phi = w2d(phi_w)[0]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    cfg = main_blocks(A, l.dtype, backward=True)
    scale = 1.0 if softmax else 1.0 / HW
    kw = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], BLOCK_A=cfg["BLOCK_A"], A_CHUNKS=cfg["A_CHUNKS"],
              PRECISION=precision_for(l.dtype, l.device), DZ_OUT=bool(deterministic), num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"])

    with on_device(l):
        target = torch.empty((B, HW, A), device=l.device, dtype=torch.float32) if deterministic else dgp

        def args(dlacc, per, nsplit):
            return (l, gp, wl, phi, logits, lse, kvec, da, dpooled, dl, target, dc, dlacc,
                    C, A, HW, W, h, w, 1.0 / up_factor, per, nsplit, int(softmax), scale,
                    *l.stride(), *dl.stride(), wl.stride(0), wl.stride(1), phi.stride(0),
                    da.stride(0), da.stride(2), da.stride(3), dpooled.stride(0), dpooled.stride(1))

        nsplit, per = _splits(grid_bwd_kernel, args(dc, 2, 2), kw, triton.cdiv(HW, cfg["BLOCK_P"]), B, l.device)
        # partial dl of the A chunks (only when A needs more than one chunk)
        n_acc = B * nsplit * cfg["BLOCK_P"] * C if cfg["A_CHUNKS"] > 1 else 1
        dlacc = torch.empty((n_acc,), device=l.device, dtype=torch.float32)
        grid_bwd_kernel[(B, nsplit)](*args(dlacc, per, nsplit), **kw)
        if deterministic:
            dgp += upsample_adjoint(target.view(B, H, W, A), h, w, up_factor)


def interpolation_matrix(n_out: int, n_in: int, up_factor: int, device) -> torch.Tensor:
    """(n_out, n_in) fp32: row d holds the weights of bilinear upsampling (align_corners=False, edge
    clamping) at output index d over the inputs, as ``_src_index`` / ``_tap`` compute them."""
    d = torch.arange(n_out, device=device, dtype=torch.float32)
    inv_up = torch.tensor(1.0 / up_factor, dtype=torch.float32, device=device)  # the kernels' fp32 inv_up
    src = ((d + 0.5) * inv_up - 0.5).clamp_min(0.0)
    i0 = src.to(torch.int64).clamp_max(n_in - 1)
    lam1 = src - i0.to(torch.float32)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    onehot = torch.nn.functional.one_hot
    return onehot(i0, n_in).to(torch.float32) * (1.0 - lam1)[:, None] + onehot(i1, n_in).to(torch.float32) * lam1[:, None]


def upsample_adjoint(dz: torch.Tensor, h: int, w: int, up_factor: int) -> torch.Tensor:
    """The adjoint of ``_upsampled_gp``: (B, H, W, A) -> (B, h, w, A) fp32, in a fixed summation
    order (two matmuls with the separable interpolation matrices; no atomics)."""
    _, H, W, _ = dz.shape
    uy = interpolation_matrix(H, h, up_factor, dz.device)
    ux = interpolation_matrix(W, w, up_factor, dz.device)
    return torch.einsum("yi,byja->bija", uy, torch.einsum("xj,byxa->byja", ux, dz))


def grid_attention_bwd_weight(l, gp, w_l, phi_w, dc, up_factor: int):
    """dW_l (A, C) and dphi (A,) in fp32 from the per-pixel ``dc`` (B, H*W) fp32."""
    B, C, H, W = l.shape
    h, w, A = gp.shape[1], gp.shape[2], gp.shape[3]
    HW = H * W
    wl = w2d(w_l)
    phi = w2d(phi_w)[0]
    precision = precision_for(l.dtype, l.device)
    cfg = weight_blocks(C, l.dtype, precision)
    n_a, n_c = triton.cdiv(A, cfg["BLOCK_A2"]), triton.cdiv(C, cfg["BLOCK_C2"])
    n_tiles = B * triton.cdiv(HW, cfg["BLOCK_P"])
    kw = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], BLOCK_A2=cfg["BLOCK_A2"], BLOCK_C2=cfg["BLOCK_C2"],
              PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    def args(dwl, dphi, per):
        return (l, gp, wl, phi, dc, dwl, dphi, C, A, HW, W, h, w, 1.0 / up_factor, n_tiles, per,
                *l.stride(), wl.stride(0), wl.stride(1), phi.stride(0))

    with on_device(l):
        nsplit, per = _splits(grid_bwd_weight_kernel, args(dc, dc, 2), kw, n_tiles, n_a * n_c, l.device)
        dwl = torch.empty((nsplit, A, C), device=l.device, dtype=torch.float32)
        dphi = torch.empty((nsplit, A), device=l.device, dtype=torch.float32)
        grid_bwd_weight_kernel[(n_a, n_c, nsplit)](*args(dwl, dphi, per), **kw)
        return dwl.sum(0), dphi.sum(0)


# ----------------------------------------------------------------------------------------------
# every configuration the launchers above can pick
# ----------------------------------------------------------------------------------------------
def _main_config(kind: str, dtype: torch.dtype, prec: str, cfg: dict, deterministic: bool = False) -> KernelConfig:
    from .aot.registry import KernelConfig, signature

    dt = DTYPES[dtype]
    tag = f"{dt}" + (f",{prec}" if dtype == torch.float32 else "")
    cx = {"BLOCK_P": cfg["BLOCK_P"], "BLOCK_C": cfg["BLOCK_C"], "BLOCK_A": cfg["BLOCK_A"],
          "A_CHUNKS": cfg["A_CHUNKS"], "PRECISION": prec}
    if kind == "bwd":
        cx["DZ_OUT"] = bool(deterministic)
    ptrs = {"l_ptr": dt, "gp_ptr": "fp32", "wl_ptr": dt, "phi_ptr": dt}
    if kind == "fwd":
        kernel = grid_fwd_kernel
        ptrs.update(bias_ptr=dt, logit_ptr="fp32", m_ptr="fp32", s_ptr="fp32", acc_ptr="fp32")
        scalars = {"inv_up": "fp32"}
    else:
        kernel = grid_bwd_kernel
        ptrs.update(logit_ptr="fp32", lse_ptr="fp32", k_ptr="fp32", da_ptr=dt, dp_ptr=dt,
                    dl_ptr=dt, dgp_ptr="fp32", dc_ptr="fp32", dlacc_ptr="fp32")
        scalars = {"inv_up": "fp32", "scale": "fp32"}
    stages = cfg["num_stages"]
    name = (f"grid_attention.{kind}[{tag},P={cfg['BLOCK_P']},C={cfg['BLOCK_C']},A={cfg['BLOCK_A']}"
            f"x{cfg['A_CHUNKS']},w={cfg['num_warps']}" + (f",s={stages}" if stages != 3 else "")
            + (",det" if deterministic else "") + "]")
    return KernelConfig(name=name, kernel=kernel,
                        signature=signature(kernel, ptrs=ptrs, scalars=scalars, constexprs=cx),
                        constexprs=cx, num_warps=cfg["num_warps"], num_stages=stages)


def _weight_config(dtype: torch.dtype, prec: str, cfg: dict) -> KernelConfig:
    from .aot.registry import KernelConfig, signature

    dt = DTYPES[dtype]
    tag = f"{dt}" + (f",{prec}" if dtype == torch.float32 else "")
    cx = {"BLOCK_P": cfg["BLOCK_P"], "BLOCK_C": cfg["BLOCK_C"], "BLOCK_A2": cfg["BLOCK_A2"],
          "BLOCK_C2": cfg["BLOCK_C2"], "PRECISION": prec}
    stages = f",s={cfg['num_stages']}" if cfg["num_stages"] != 3 else ""
    name = (f"grid_attention.bwd_weight[{tag},P={cfg['BLOCK_P']},C={cfg['BLOCK_C']},A2={cfg['BLOCK_A2']},"
            f"C2={cfg['BLOCK_C2']},w={cfg['num_warps']}{stages}]")
    return KernelConfig(
        name=name, kernel=grid_bwd_weight_kernel,
        signature=signature(grid_bwd_weight_kernel,
                            ptrs={"l_ptr": dt, "gp_ptr": "fp32", "wl_ptr": dt, "phi_ptr": dt,
                                  "dc_ptr": "fp32", "dwl_ptr": "fp32", "dphi_ptr": "fp32"},
                            scalars={"inv_up": "fp32"}, constexprs=cx),
        constexprs=cx, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def aot_configs() -> list:
    """Every config the launchers can pick: main kernels for every A bucket (16..512, deduplicated:
    several buckets share one A-chunked config; the backward with atomics and deterministic), the
    weight kernel for every C bucket, the combine."""
    from .aot.registry import KernelConfig, signature

    configs = {}
    for dtype, dt in DTYPES.items():
        for prec in dot_precisions(dtype):
            for bucket in (16, 32, 64, 128, 256, 512):
                for kind, det in (("fwd", False), ("bwd", False), ("bwd", True)):
                    kc = _main_config(kind, dtype, prec, main_blocks(bucket, dtype, backward=kind == "bwd"), det)
                    configs.setdefault(kc.name, kc)
            for c in (16, 32, 64, 128, 256, 512):
                kc = _weight_config(dtype, prec, weight_blocks(c, dtype, prec))
                configs.setdefault(kc.name, kc)
        cx = {"BLOCK_S": BLOCK_S, "BLOCK_C": COMBINE_BLOCK_C, "BLOCK_HW": COMBINE_BLOCK_HW}
        configs[f"grid_attention.combine[{dt}]"] = KernelConfig(
            name=f"grid_attention.combine[{dt}]", kernel=grid_combine_kernel,
            signature=signature(grid_combine_kernel,
                                ptrs={"m_ptr": "fp32", "s_ptr": "fp32", "acc_ptr": "fp32", "logit_ptr": "fp32",
                                      "a_ptr": dt, "pooled_ptr": dt, "pooled32_ptr": "fp32", "lse_ptr": "fp32"},
                                scalars={"inv_hw": "fp32"}, constexprs=cx),
            constexprs=cx, num_warps=4)
    return list(configs.values())
