"""Attention pooling with a linear score (Learn to Pay Attention ``LinearAttentionBlock``, timm ``GlobalContext``):
Triton forward and backward.

Per sample ``b`` and pixel ``p`` of ``l`` (C channels, H x W)::

    c_p = w . (l_p + g_p) + bias             g: none, pooled (B or 1, C, 1, 1) or a map like l
    softmax: a = softmax_p(c)     sigmoid: a = sigmoid(c)
    pooled = s * sum_p a_p l_p    s = 1 (sum) or 1 / (H*W) (mean)

Kernels
- ``attention_pool_fwd_kernel`` (grid B x NSPLIT, a flash-decoding split of H*W): one pass over ``l``: per pixel
  tile the logits (a reduction over C chunks), stored fp32 and in the output dtype, the online-softmax partials
  (max, sum) and ``acc[C] = sum_p exp(c_p - max) l_p`` (sigmoid: ``sum_p sigmoid(c_p) l_p``) in a
  program-private fp32 row of global memory, updated right after the tile was read for the logits (the re-read
  hits cache). ``g`` is read with ``l`` through its expanded strides (0 over the pixels for a pooled ``g``: every
  product is taken per element, ``w_c (l_c + g_c)``, so infinities meet as in eager's ``op(l + g)``).
- ``attention_pool_combine_kernel`` (grid B): merges the partials into the softmax (max, sum) and pooled (fp32 and output dtype).
- ``attention_pool_bwd_kernel`` (grid B x NSPLIT): recomputes ``a`` from the saved fp32 logits, then
  ``dc_p = dc_out_p + a_p (s dpooled . l_p - K)`` (softmax, ``K = dpooled . pooled``) or
  ``dc_out_p + s dpooled . l_p a_p (1 - a_p)`` (sigmoid); writes ``dl = s a dpooled + dc w`` (and ``dg = dc w``
  for a map ``g``) and per-program fp32 partials of ``dw = sum_p dc_p (l_p + g_p)``, ``sum_p dc_p`` and, for a
  pooled ``g``, ``dg = sum_p dc_p w`` (the caller sums the few partials: deterministic, no atomics).

The softmax statistics are kept as (max, sum) per sample, not as one log-sum-exp: ``a = exp(c - max) / sum`` is
what eager softmax computes, to a relative eps, while ``exp(c - lse)`` carries lse's rounding (eps * |lse|, 4e-6
at logits of order 60), which the gradients of a shift-invariant softmax (a pooled ``g``, the bias: exactly 0
without a gradient into ``c``) would show as noise 100x eager's.

Statistics and accumulation are fp32 whatever the storage dtype. Every operand is read through its strides
(NCHW, channels_last, stride-0 gradients); offsets inside one sample are 32-bit (the op checks the size).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DTYPES, on_device, splits

BLOCK_S = 64  # most splits of H*W per sample (the combine reads them as one vector)
COMBINE_BLOCK_C = 32
# (BLOCK_P, BLOCK_C, num_warps) per direction and storage dtype (benchmarks/results/kernel_tuning.md)
TILES = {("fwd", "fp32"): (32, 32, 4), ("fwd", "16"): (32, 32, 4),
         ("bwd", "fp32"): (16, 32, 4), ("bwd", "16"): (16, 32, 4)}


def tile(kind: str, dtype: torch.dtype) -> tuple:
    return TILES[(kind, "fp32" if dtype == torch.float32 else "16")]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_pixels(t, HW, W, BLOCK_P: tl.constexpr):
    """Pixel indices of tile ``t`` (masked lanes clamped to pixel 0), the mask and (y, x)."""
    pix = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = pix < HW
    pix = tl.where(mask_p, pix, 0)
    y = pix // W
    return pix, mask_p, y, pix - y * W


@triton.jit
def _load_tile(base, row_off, offs_c, s_c, mask2):
    return tl.load(base + row_off[:, None] + offs_c[None, :] * s_c, mask=mask2, other=0.0).to(tl.float32)


@triton.jit
def _zero_row(row, C, BLOCK_C: tl.constexpr):
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tl.store(row + offs_c, tl.zeros((BLOCK_C,), dtype=tl.float32), mask=offs_c < C)
    tl.debug_barrier()  # the zeros are visible to every thread before the first read-modify-write


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["tiles_per_split", "nsplit", "softmax", "g_mode"])
def attention_pool_fwd_kernel(l_ptr, g_ptr, w_ptr, off_ptr, logit_ptr, c_ptr, m_ptr, s_ptr, acc_ptr,
                              C, HW, W, tiles_per_split, nsplit, softmax, g_mode,
                              sl_b, sl_c, sl_h, sl_w, sg_b, sg_c, sg_h, sg_w, sw,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``softmax``: 1 softmax, 0 sigmoid; ``g_mode``: 0 no g, 1 pooled g, 2 a map (both read through strides).
    Runtime switches (uniform per launch): one binary per dtype."""
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    off = tl.load(off_ptr + b)
    acc_row = acc_ptr + (b * nsplit + sp) * C
    _zero_row(acc_row, C, BLOCK_C)
    l_b = l_ptr + b * sl_b
    g_b = g_ptr + b * sg_b
    m_run = tl.max(tl.full((BLOCK_P,), float("-inf"), tl.float32), axis=0)
    s_run = tl.sum(tl.zeros((BLOCK_P,), dtype=tl.float32), axis=0)
    t_begin = sp * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(HW, BLOCK_P))
    for t in range(t_begin, t_end):
        pix, mask_p, y, x = _tile_pixels(t, HW, W, BLOCK_P)
        row_l = y * sl_h + x * sl_w
        row_g = y * sg_h + x * sg_w
        c = tl.zeros((BLOCK_P,), dtype=tl.float32) + off
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            mask2 = mask_p[:, None] & mask_c[None, :]
            xt = _load_tile(l_b, row_l, offs_c, sl_c, mask2)
            if g_mode != 0:
                xt += _load_tile(g_b, row_g, offs_c, sg_c, mask2)
            wv = tl.load(w_ptr + offs_c * sw, mask=mask_c, other=0.0).to(tl.float32)
            c += tl.sum(xt * wv[None, :], axis=1)
        tl.store(logit_ptr + b * HW + pix, c, mask=mask_p)
        tl.store(c_ptr + b * HW + pix, c.to(c_ptr.dtype.element_ty), mask=mask_p)
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
            alpha = s_run * 0.0 + 1.0
            p = tl.where(mask_p, tl.sigmoid(c), 0.0)
        for c0 in range(0, C, BLOCK_C):  # acc = acc * alpha + sum_p p l_p   (the l tile is cache-hot)
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            lt = _load_tile(l_b, row_l, offs_c, sl_c, mask_p[:, None] & mask_c[None, :])
            old = tl.load(acc_row + offs_c, mask=mask_c, other=0.0)
            tl.store(acc_row + offs_c, old * alpha + tl.sum(p[:, None] * lt, axis=0), mask=mask_c)
        tl.debug_barrier()
    tl.store(m_ptr + b * nsplit + sp, m_run)
    tl.store(s_ptr + b * nsplit + sp, s_run)


@triton.jit(do_not_specialize=["nsplit", "softmax"])
def attention_pool_combine_kernel(m_ptr, s_ptr, acc_ptr, pooled_ptr, pooled32_ptr, stats_ptr,
                                  C, nsplit, softmax, scale, sp_b, sp_c,
                                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < nsplit
    if softmax != 0:
        ms = tl.load(m_ptr + b * nsplit + offs_s, mask=mask_s, other=float("-inf"))
        ss = tl.load(s_ptr + b * nsplit + offs_s, mask=mask_s, other=0.0)
        mx = tl.max(ms, axis=0)
        wgt = tl.where(mask_s, tl.exp(ms - mx), 0.0)
        total = tl.sum(ss * wgt, axis=0)
        wgt = wgt / total * scale
    else:
        mx = tl.sum(tl.zeros((BLOCK_S,), dtype=tl.float32), axis=0)
        total = mx
        wgt = tl.where(mask_s, scale, 0.0)
    tl.store(stats_ptr + 2 * b, mx)
    tl.store(stats_ptr + 2 * b + 1, total)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc = tl.load(acc_ptr + (b * nsplit + offs_s[:, None]) * C + offs_c[None, :],
                      mask=mask_s[:, None] & mask_c[None, :], other=0.0)
        pooled = tl.sum(acc * wgt[:, None], axis=0)
        tl.store(pooled32_ptr + b * C + offs_c, pooled, mask=mask_c)
        tl.store(pooled_ptr + b * sp_b + offs_c * sp_c, pooled.to(pooled_ptr.dtype.element_ty), mask=mask_c)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["tiles_per_split", "nsplit", "softmax", "g_mode"])
def attention_pool_bwd_kernel(l_ptr, g_ptr, w_ptr, logit_ptr, stats_ptr, k_ptr, dc_ptr, dp_ptr,
                              dl_ptr, dg_ptr, dw_ptr, dsum_ptr,
                              C, HW, W, tiles_per_split, nsplit, softmax, g_mode, scale,
                              sl_b, sl_c, sl_h, sl_w, sg_b, sg_c, sg_h, sg_w, sw,
                              sdc_b, sdc_h, sdc_w, sdp_b, sdp_c,
                              sdl_b, sdl_c, sdl_h, sdl_w, sdg_b, sdg_c, sdg_h, sdg_w,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``g_mode``: 0 no g, 1 pooled g (``dg_ptr``: per-program fp32 rows like ``dw_ptr``), 2 a map (``dg``
    written per element through its strides)."""
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    mx = tl.load(stats_ptr + 2 * b)
    total = tl.load(stats_ptr + 2 * b + 1)
    kk = tl.load(k_ptr + b)
    dw_row = dw_ptr + (b * nsplit + sp) * C
    _zero_row(dw_row, C, BLOCK_C)
    dg_row = dg_ptr + (b * nsplit + sp) * C
    if g_mode == 1:
        _zero_row(dg_row, C, BLOCK_C)
    l_b = l_ptr + b * sl_b
    g_b = g_ptr + b * sg_b
    dl_b = dl_ptr + b * sdl_b
    dg_b = dg_ptr + b * sdg_b
    dp_b = dp_ptr + b * sdp_b
    dsum = tl.sum(tl.zeros((BLOCK_P,), dtype=tl.float32), axis=0)
    t_begin = sp * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(HW, BLOCK_P))
    for t in range(t_begin, t_end):
        pix, mask_p, y, x = _tile_pixels(t, HW, W, BLOCK_P)
        row_l = y * sl_h + x * sl_w
        c = tl.load(logit_ptr + b * HW + pix, mask=mask_p, other=0.0)
        if softmax != 0:
            a = tl.exp(c - mx) / total
        else:
            a = tl.sigmoid(c)
        gdot = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):  # dpooled . l_p
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            lt = _load_tile(l_b, row_l, offs_c, sl_c, mask_p[:, None] & mask_c[None, :])
            dp = tl.load(dp_b + offs_c * sdp_c, mask=mask_c, other=0.0).to(tl.float32)
            gdot += tl.sum(lt * dp[None, :], axis=1)
        ghat = gdot * scale
        dco = tl.load(dc_ptr + b * sdc_b + y * sdc_h + x * sdc_w, mask=mask_p, other=0.0).to(tl.float32)
        if softmax != 0:
            dc = dco + a * (ghat - kk)
        else:
            dc = dco + ghat * a * (1.0 - a)
        dc = tl.where(mask_p, dc, 0.0)
        dsum += tl.sum(dc, axis=0)
        sa = a * scale
        for c0 in range(0, C, BLOCK_C):  # dl, dg, dw partial (the l tile is cache-hot)
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            mask2 = mask_p[:, None] & mask_c[None, :]
            xt = _load_tile(l_b, row_l, offs_c, sl_c, mask2)
            dp = tl.load(dp_b + offs_c * sdp_c, mask=mask_c, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + offs_c * sw, mask=mask_c, other=0.0).to(tl.float32)
            dx = dc[:, None] * wv[None, :]
            dl = sa[:, None] * dp[None, :] + dx
            tl.store(dl_b + (y * sdl_h + x * sdl_w)[:, None] + offs_c[None, :] * sdl_c,
                     dl.to(dl_ptr.dtype.element_ty), mask=mask2)
            if g_mode == 2:
                tl.store(dg_b + (y * sdg_h + x * sdg_w)[:, None] + offs_c[None, :] * sdg_c,
                         dx.to(dg_ptr.dtype.element_ty), mask=mask2)
            if g_mode == 1:  # sum_p dc_p w_c per element, as eager's expand backward sums (inf meets inf there)
                old = tl.load(dg_row + offs_c, mask=mask_c, other=0.0)
                tl.store(dg_row + offs_c, old + tl.sum(tl.where(mask2, dx, 0.0), axis=0), mask=mask_c)
            if g_mode != 0:
                xt += _load_tile(g_b, y * sg_h + x * sg_w, offs_c, sg_c, mask2)
            old = tl.load(dw_row + offs_c, mask=mask_c, other=0.0)
            tl.store(dw_row + offs_c, old + tl.sum(tl.where(mask2, dc[:, None] * xt, 0.0), axis=0), mask=mask_c)
        tl.debug_barrier()
    tl.store(dsum_ptr + b * nsplit + sp, dsum)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def g_mode(g) -> int:
    return 0 if g is None else (2 if tuple(g.shape[2:]) != (1, 1) else 1)


def _g_strides(g, l):
    """Strides of ``g`` expanded to ``l``'s shape (0 where it broadcasts)."""
    return g.expand(l.shape).stride() if g is not None else (0, 0, 0, 0)


def attention_pool_fwd(l, w, off, g, softmax: bool, mean: bool, c_out, pooled, logits, stats, pooled32):
    """Forward. ``w``: (C,) any stride; ``off``: (B,) fp32 (the bias); ``g``: None, (B or 1, C, 1, 1) or like ``l``
    (any strides). Writes c_out (B, 1, H, W) contiguous in l's dtype, pooled (B, C) any strides, logits (B, H*W) fp32,
    stats (B, 2) fp32 (softmax max and sum; zeros for sigmoid) and pooled32 (B, C) fp32."""
    B, C, H, W = l.shape
    HW = H * W
    bp, bc, warps = tile("fwd", l.dtype)
    kw = dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    gt = g if g is not None else l

    def args(m, s, acc, per, nsplit):
        return (l, gt, w, off, logits, c_out, m, s, acc, C, HW, W, per, nsplit, int(softmax), g_mode(g),
                *l.stride(), *_g_strides(g, l), w.stride(0))

    with on_device(l):
        nsplit, per = splits(attention_pool_fwd_kernel, args(logits, logits, logits, 2, 2), kw,
                             triton.cdiv(HW, bp), B, l.device, BLOCK_S)
        m = torch.empty((B, nsplit), device=l.device, dtype=torch.float32)
        s = torch.empty_like(m)
        acc = torch.empty((B, nsplit, C), device=l.device, dtype=torch.float32)
        attention_pool_fwd_kernel[(B, nsplit)](*args(m, s, acc, per, nsplit), **kw)
        attention_pool_combine_kernel[(B,)](
            m, s, acc, pooled, pooled32, stats, C, nsplit, int(softmax), 1.0 / HW if mean else 1.0, pooled.stride(0),
            pooled.stride(1), BLOCK_S=BLOCK_S, BLOCK_C=COMBINE_BLOCK_C, num_warps=4)


def attention_pool_bwd(l, w, g, logits, stats, kvec, dc, dpooled, softmax: bool, mean: bool, dl, dg):
    """Backward. ``dc``: (B, 1, H, W) any strides (stride 0 ok); ``dpooled``: (B, C) any strides; ``kvec``:
    (B,) fp32 = dpooled . pooled. Writes ``dl`` (and ``dg`` for a map ``g``) through their strides; returns fp32
    ``(dw (C,), dsum (B,), dg (B, C) for a pooled g, else None)``."""
    B, C, H, W = l.shape
    HW = H * W
    bp, bc, warps = tile("bwd", l.dtype)
    mode = g_mode(g)
    kw = dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    gt = g if g is not None else l

    def args(dw, dsum, dgt, per, nsplit):
        dg_strides = _g_strides(dgt, l) if mode == 2 else (0, 0, 0, 0)
        return (l, gt, w, logits, stats, kvec, dc, dpooled, dl, dgt, dw, dsum, C, HW, W, per, nsplit, int(softmax),
                mode, 1.0 / HW if mean else 1.0, *l.stride(), *_g_strides(g, l), w.stride(0),
                dc.stride(0), dc.stride(2), dc.stride(3), *dpooled.stride(), *dl.stride(), *dg_strides)

    with on_device(l):
        placeholder = dg if mode == 2 else logits
        nsplit, per = splits(attention_pool_bwd_kernel, args(logits, logits, placeholder, 2, 2), kw,
                             triton.cdiv(HW, bp), B, l.device, BLOCK_S)
        dw = torch.empty((B, nsplit, C), device=l.device, dtype=torch.float32)
        dsum = torch.empty((B, nsplit), device=l.device, dtype=torch.float32)
        dgrows = torch.empty((B, nsplit, C), device=l.device, dtype=torch.float32) if mode == 1 else None
        attention_pool_bwd_kernel[(B, nsplit)](*args(dw, dsum, dg if mode == 2 else (dgrows if mode else dw),
                                                     per, nsplit), **kw)
    return dw.sum((0, 1)), dsum.sum(1), dgrows.sum(1) if mode == 1 else None


# ----------------------------------------------------------------------------------------------
# every configuration the launchers above can pick
# ----------------------------------------------------------------------------------------------
def aot_configs() -> list:
    """Forward and backward for every dtype (softmax/sigmoid and the g layout are runtime switches); the combine."""
    from .aot.registry import KernelConfig, signature

    configs = []
    for dtype, dt in DTYPES.items():
        for kind, kernel, ptrs in (
                ("fwd", attention_pool_fwd_kernel,
                 {"l_ptr": dt, "g_ptr": dt, "w_ptr": dt, "off_ptr": "fp32", "logit_ptr": "fp32", "c_ptr": dt,
                  "m_ptr": "fp32", "s_ptr": "fp32", "acc_ptr": "fp32"}),
                ("bwd", attention_pool_bwd_kernel,
                 {"l_ptr": dt, "g_ptr": dt, "w_ptr": dt, "logit_ptr": "fp32", "stats_ptr": "fp32", "k_ptr": "fp32",
                  "dc_ptr": dt, "dp_ptr": dt, "dl_ptr": dt, "dg_ptr": dt, "dw_ptr": "fp32", "dsum_ptr": "fp32"})):
            bp, bc, warps = tile(kind, dtype)
            cx = {"BLOCK_P": bp, "BLOCK_C": bc}
            configs.append(KernelConfig(
                name=f"attention_pool.{kind}[{dt},P={bp},C={bc},w={warps}]", kernel=kernel, constexprs=cx,
                num_warps=warps, signature=signature(kernel, ptrs=ptrs, scalars={"scale": "fp32"} if kind == "bwd"
                                                     else {}, constexprs=cx)))
        cx = {"BLOCK_S": BLOCK_S, "BLOCK_C": COMBINE_BLOCK_C}
        configs.append(KernelConfig(
            name=f"attention_pool.combine[{dt},S={BLOCK_S},C={COMBINE_BLOCK_C}]", kernel=attention_pool_combine_kernel,
            constexprs=cx, num_warps=4,
            signature=signature(attention_pool_combine_kernel,
                                ptrs={"m_ptr": "fp32", "s_ptr": "fp32", "acc_ptr": "fp32", "pooled_ptr": dt,
                                      "pooled32_ptr": "fp32", "stats_ptr": "fp32"},
                                scalars={"scale": "fp32"}, constexprs=cx)))
    return configs
