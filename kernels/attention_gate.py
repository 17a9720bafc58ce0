"""Fused attention gate (Attention U-Net: MONAI ``AttentionBlock``, Attention-Gated-Networks' grid gate):
Triton forward and backward of the gate's logits, and of the gating product.

Per sample and pixel ``p`` of theta's grid (Ht x Wt = H // KS x W // KS)::

    z_p     = W_x patch_KS(x)_p + W_g up(g)_p + up(bias)   (F channels, never written to memory)
    logit_p = psi . relu(z_p) + psi_bias

``patch_KS(x)_p`` is the KS x KS x C patch of x under p (stride KS, no padding: theta's convolution; KS = 1
is a 1x1 convolution), ``up`` bilinear resizing of g to Ht x Wt (align_corners=False, PyTorch's taps and
edge clamping; a 1x1 conv commutes with it, so ``up(W_g g) = W_g up(g)``), skipped when g is already
Ht x Wt (INTERP=False). BatchNorm of the projections is folded into W_x, W_g and bias by the caller.

Kernels
- ``ag_fwd_kernel`` (grid tiles x B): z for BLOCK_P pixels x all F channels (F <= MAX_F) by ``tl.dot``
  over chunks of the reduction (C * KS * KS for x, C_g for g), then the fp32 logits (B, Ht * Wt).
- ``ag_bwd_kernel`` (grid tiles x B): recomputes z, ``dz = relu'(z) * dlogit * psi``, writes
  ``dx = W_x^T dz`` into x's patches and ``dĝ = W_g^T dz`` (B, C_g, Ht, Wt) (the caller maps dĝ back
  through ``up``'s adjoint when INTERP).
- ``ag_bwd_weight_kernel`` (grid K-blocks x NSPLIT): recomputes z over its range of (sample, tile) pairs
  and accumulates one BLOCK_K2 column block of dW = [dW_x | dW_g] (F x (C KS^2 + C_g)) in registers, plus
  dbias and dpsi (K-block 0), written once per split as fp32 partials the caller sums: deterministic.
- ``gate_fwd_kernel`` / ``gate_bwd_kernel`` (grid tiles x B): ``y = x * m`` for a one-channel map m;
  backward ``dx = dy * m`` and ``dm = sum_c dy * x`` in one pass over dy and x.

fp32 accumulation everywhere; fp32 inputs use TF32 dots exactly when eager fp32 convolutions would
(``_launch.dot_precision(..., like="conv")``). The weight kernel's split count comes from its real occupancy
(``_launch.splits``). Every tensor is read through its strides (NCHW, channels_last).
NaN/inf: relu keeps NaN, its gradient passes NaN (eager's ``threshold_backward``), padded lanes are zeroed
before they can turn ``0 * inf`` into NaN in real elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DTYPES, dot_precision, dot_precisions, on_device, splits

MAX_F = 256  # inter channels held in registers; larger -> the PyTorch path
BLOCK_K = 16
BLOCK_K2 = 16
GATE_BLOCK_P = 64
GATE_BLOCK_C = 16


def blocks(F: int, dtype: torch.dtype) -> dict:
    """Tile of the logits kernels for F inter channels (padded to a power of two >= 32). One software-pipeline
    stage and 16 x 16 operand tiles: the whole F-wide z tile stays in registers, and deeper pipelines or wider
    tiles spilled on sm_80/sm_90 (the AOT report: ``python -m attnfast.kernels.aot --filter attention_gate.``)."""
    bf = max(32, triton.next_power_of_2(F))
    warps = 4 if bf <= 64 and dtype != torch.float32 else 8  # fp32 on 4 warps: the weight kernel spilled (sm_90)
    return {"BLOCK_P": 16, "BLOCK_F": bf, "BLOCK_K": BLOCK_K, "num_warps": warps, "num_stages": 1}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _relu(z):
    return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_grad(z, g):
    return tl.where(z <= 0.0, 0.0, g)


@triton.jit
def _tile(t, P, Wt, BLOCK_P: tl.constexpr):
    pix = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = pix < P
    pix = tl.where(mask_p, pix, 0)
    i = pix // Wt
    return pix, mask_p, i, pix - i * Wt


@triton.jit
def _x_cols(k0, KX, sx_c, sx_h, sx_w, KS, BLOCK_K: tl.constexpr):
    """Reduction indices k0 + [0, BLOCK_K) of a KS x KS x C patch, in conv-weight order (c, dy, dx):
    their offsets inside a patch and mask."""
    kk = k0 + tl.arange(0, BLOCK_K)
    c = kk // (KS * KS)
    r = kk - c * (KS * KS)
    dy = r // KS
    return kk, c * sx_c + dy * sx_h + (r - dy * KS) * sx_w, kk < KX


@triton.jit
def _src(dst, scale, n_in):
    """PyTorch's bilinear source taps (align_corners=False, size given): i0, i1, lambda1."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)
    lam = src - i0.to(tl.float32)
    return i0, tl.where(i0 < n_in - 1, i0 + 1, i0), lam


@triton.jit
def _g_tile(g_b, i, j, mask_p, kk, mask_k, h, w, scale_h, scale_w, sg_c, sg_h, sg_w, INTERP: tl.constexpr):
    """g (resized to theta's grid when INTERP) at pixels (i, j), channels kk: (P, BLOCK_K) fp32."""
    m2 = mask_p[:, None] & mask_k[None, :]
    col = (kk * sg_c)[None, :]
    if INTERP:
        y0, y1, ly = _src(i, scale_h, h)
        x0, x1, lx = _src(j, scale_w, w)
        v00 = tl.load(g_b + (y0 * sg_h + x0 * sg_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
        v01 = tl.load(g_b + (y0 * sg_h + x1 * sg_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
        v10 = tl.load(g_b + (y1 * sg_h + x0 * sg_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
        v11 = tl.load(g_b + (y1 * sg_h + x1 * sg_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
        lx2 = lx[:, None]
        ly2 = ly[:, None]
        v = (1.0 - ly2) * ((1.0 - lx2) * v00 + lx2 * v01) + ly2 * ((1.0 - lx2) * v10 + lx2 * v11)
    else:
        v = tl.load(g_b + (i * sg_h + j * sg_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
    return v


@triton.jit
def _z_tile(x_b, g_b, wx_ptr, wg_ptr, b_ptr, i, j, mask_p, offs_f, mask_f, C, CG, h, w, scale_h, scale_w,
            sx_c, sx_h, sx_w, sg_c, sg_h, sg_w,
            KS, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
    """z (P, BLOCK_F) fp32 with bias; padded rows and channels 0. W_x is (F, C*KS*KS), W_g (F, CG),
    both contiguous and in x's dtype."""
    KX = C * KS * KS
    row = (i * KS) * sx_h + (j * KS) * sx_w
    z = tl.zeros((BLOCK_P, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, KX, BLOCK_K):
        kk, col, mask_k = _x_cols(k0, KX, sx_c, sx_h, sx_w, KS, BLOCK_K)
        xt = tl.load(x_b + row[:, None] + col[None, :], mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(wx_ptr + offs_f[None, :] * KX + kk[:, None], mask=mask_k[:, None] & mask_f[None, :], other=0.0)
        z = tl.dot(xt, wt, z, input_precision=PRECISION)
    for k0 in range(0, CG, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < CG
        gt = _g_tile(g_b, i, j, mask_p, kk, mask_k, h, w, scale_h, scale_w, sg_c, sg_h, sg_w, INTERP)
        wt = tl.load(wg_ptr + offs_f[None, :] * CG + kk[:, None], mask=mask_k[:, None] & mask_f[None, :], other=0.0)
        z = tl.dot(gt.to(wg_ptr.dtype.element_ty), wt, z, input_precision=PRECISION)
    bias = tl.load(b_ptr + offs_f, mask=mask_f, other=0.0)[None, :]
    if INTERP:  # through the resize's taps, as eager adds it before resizing (0 * inf = NaN included)
        _, _, ly = _src(i, scale_h, h)
        _, _, lx = _src(j, scale_w, w)
        lx2 = lx[:, None]
        ly2 = ly[:, None]
        bias = (1.0 - ly2) * ((1.0 - lx2) * bias + lx2 * bias) + ly2 * ((1.0 - lx2) * bias + lx2 * bias)
    z += bias
    return tl.where(mask_p[:, None] & mask_f[None, :], z, 0.0)


@triton.jit
def _program_z(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, psi_ptr, C, CG, F, Ht, Wt, h, w, scale_h, scale_w,
               sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w,
               KS, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
    """This program's (sample, pixel tile) of the (tiles, B) grid: its pixels, z (P, BLOCK_F) and psi."""
    b64 = tl.program_id(1).to(tl.int64)
    P = Ht * Wt
    pix, mask_p, i, j = _tile(tl.program_id(0), P, Wt, BLOCK_P)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    z = _z_tile(x_ptr + b64 * sx_b, g_ptr + b64 * sg_b, wx_ptr, wg_ptr, b_ptr, i, j, mask_p, offs_f, mask_f,
                C, CG, h, w, scale_h, scale_w, sx_c, sx_h, sx_w, sg_c, sg_h, sg_w,
                KS, INTERP, BLOCK_P, BLOCK_K, BLOCK_F, PRECISION)
    psi = tl.load(psi_ptr + offs_f, mask=mask_f, other=0.0)
    return b64, P, pix, mask_p, i, j, offs_f, mask_f, z, psi


# ----------------------------------------------------------------------------------------------
# logits: forward, data backward, weight backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def ag_fwd_kernel(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, psi_ptr, psib_ptr, logit_ptr,
                  C, CG, F, Ht, Wt, h, w, scale_h, scale_w,
                  sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w,
                  KS, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
    b64, P, pix, mask_p, i, j, offs_f, mask_f, z, psi = _program_z(
        x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, psi_ptr, C, CG, F, Ht, Wt, h, w, scale_h, scale_w,
        sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, KS, INTERP, BLOCK_P, BLOCK_K, BLOCK_F, PRECISION)
    logit = tl.sum(_relu(z) * psi[None, :], axis=1) + tl.load(psib_ptr)
    tl.store(logit_ptr + b64 * P + pix, logit, mask=mask_p)


@triton.jit
def ag_bwd_kernel(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, psi_ptr, dlogit_ptr, dx_ptr, dg_ptr,
                  C, CG, F, Ht, Wt, h, w, scale_h, scale_w,
                  sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w,
                  sdx_b, sdx_c, sdx_h, sdx_w, sdg_b, sdg_c, sdg_h, sdg_w,
                  KS, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
    """dx into x's patches (pixels outside every patch are the caller's), dg at theta's grid (P x CG)."""
    b64, P, pix, mask_p, i, j, offs_f, mask_f, z, psi = _program_z(
        x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, psi_ptr, C, CG, F, Ht, Wt, h, w, scale_h, scale_w,
        sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, KS, INTERP, BLOCK_P, BLOCK_K, BLOCK_F, PRECISION)
    dl = tl.load(dlogit_ptr + b64 * P + pix, mask=mask_p, other=0.0)
    dz = _relu_grad(z, dl[:, None] * psi[None, :])
    dz = tl.where(mask_p[:, None] & mask_f[None, :], dz, 0.0).to(wx_ptr.dtype.element_ty)
    KX = C * KS * KS
    row = (i * KS) * sdx_h + (j * KS) * sdx_w
    dx_b = dx_ptr + b64 * sdx_b
    for k0 in range(0, KX, BLOCK_K):
        kk, col, mask_k = _x_cols(k0, KX, sdx_c, sdx_h, sdx_w, KS, BLOCK_K)
        wt = tl.load(wx_ptr + offs_f[:, None] * KX + kk[None, :], mask=mask_f[:, None] & mask_k[None, :], other=0.0)
        dxt = tl.dot(dz, wt, input_precision=PRECISION)
        tl.store(dx_b + row[:, None] + col[None, :], dxt.to(dx_ptr.dtype.element_ty),
                 mask=mask_p[:, None] & mask_k[None, :])
    grow = i * sdg_h + j * sdg_w
    dg_b = dg_ptr + b64 * sdg_b
    for k0 in range(0, CG, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < CG
        wt = tl.load(wg_ptr + offs_f[:, None] * CG + kk[None, :], mask=mask_f[:, None] & mask_k[None, :], other=0.0)
        dgt = tl.dot(dz, wt, input_precision=PRECISION)
        tl.store(dg_b + grow[:, None] + (kk * sdg_c)[None, :], dgt.to(dg_ptr.dtype.element_ty),
                 mask=mask_p[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["n_tiles", "tiles_per_split"])
def ag_bwd_weight_kernel(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, psi_ptr, dlogit_ptr, dw_ptr, dbias_ptr, dpsi_ptr,
                         C, CG, F, Ht, Wt, h, w, scale_h, scale_w, n_tiles, tiles_per_split,
                         sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w,
                         KS, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_F: tl.constexpr, BLOCK_K2: tl.constexpr, PRECISION: tl.constexpr):
    """Program (kb, sp): columns [kb * BLOCK_K2, +BLOCK_K2) of dW = [dW_x | dW_g] (x's K-blocks first, then
    g's), summed over split sp's (sample, tile) pairs; K-block 0 also sums dbias and dpsi."""
    kb = tl.program_id(0)
    sp = tl.program_id(1)
    KX = C * KS * KS
    n_kx = tl.cdiv(KX, BLOCK_K2)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    psi = tl.load(psi_ptr + offs_f, mask=mask_f, other=0.0)
    acc = tl.zeros((BLOCK_F, BLOCK_K2), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_F,), dtype=tl.float32)
    dpsi = tl.zeros((BLOCK_F,), dtype=tl.float32)
    P = Ht * Wt
    tiles_per_sample = tl.cdiv(P, BLOCK_P)
    t_begin = sp * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    on_x = kb < n_kx
    k0 = tl.where(on_x, kb * BLOCK_K2, (kb - n_kx) * BLOCK_K2)
    for t in range(t_begin, t_end):
        b64 = (t // tiles_per_sample).to(tl.int64)
        pix, mask_p, i, j = _tile(t % tiles_per_sample, P, Wt, BLOCK_P)
        x_b = x_ptr + b64 * sx_b
        g_b = g_ptr + b64 * sg_b
        z = _z_tile(x_b, g_b, wx_ptr, wg_ptr, b_ptr, i, j, mask_p, offs_f, mask_f,
                    C, CG, h, w, scale_h, scale_w, sx_c, sx_h, sx_w, sg_c, sg_h, sg_w,
                    KS, INTERP, BLOCK_P, BLOCK_K, BLOCK_F, PRECISION)
        dl = tl.load(dlogit_ptr + b64 * P + pix, mask=mask_p, other=0.0)
        dz = _relu_grad(z, dl[:, None] * psi[None, :])
        dz = tl.where(mask_p[:, None] & mask_f[None, :], dz, 0.0)
        if kb == 0:
            dbias += tl.sum(dz, axis=0)
            dpsi += tl.sum(dl[:, None] * _relu(z), axis=0)
        if on_x:
            kk, col, mask_k = _x_cols(k0, KX, sx_c, sx_h, sx_w, KS, BLOCK_K2)
            row = (i * KS) * sx_h + (j * KS) * sx_w
            tt = tl.load(x_b + row[:, None] + col[None, :], mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        else:
            kk = k0 + tl.arange(0, BLOCK_K2)
            mask_k = kk < CG
            tt = _g_tile(g_b, i, j, mask_p, kk, mask_k, h, w, scale_h, scale_w, sg_c, sg_h, sg_w,
                         INTERP).to(wx_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(dz.to(wx_ptr.dtype.element_ty)), tt, acc, input_precision=PRECISION)
    KT = KX + CG
    cols = tl.where(on_x, k0, KX + k0) + tl.arange(0, BLOCK_K2)
    n_valid = tl.where(on_x, KX, KT)
    tl.store(dw_ptr + (sp.to(tl.int64) * F + offs_f[:, None]) * KT + cols[None, :], acc,
             mask=mask_f[:, None] & (cols < n_valid)[None, :])
    if kb == 0:
        tl.store(dbias_ptr + sp.to(tl.int64) * F + offs_f, dbias, mask=mask_f)
        tl.store(dpsi_ptr + sp.to(tl.int64) * F + offs_f, dpsi, mask=mask_f)


# ----------------------------------------------------------------------------------------------
# the gating product y = x * m (m: one channel)
# ----------------------------------------------------------------------------------------------
@triton.jit
def gate_fwd_kernel(x_ptr, m_ptr, y_ptr, C, H, W,
                    sx_b, sx_c, sx_h, sx_w, sm_b, sm_h, sm_w, sy_b, sy_c, sy_h, sy_w,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b64 = tl.program_id(1).to(tl.int64)
    pix, mask_p, i, j = _tile(tl.program_id(0), H * W, W, BLOCK_P)
    m = tl.load(m_ptr + b64 * sm_b + i * sm_h + j * sm_w, mask=mask_p, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        m2 = mask_p[:, None] & (cc < C)[None, :]
        xt = tl.load(x_ptr + b64 * sx_b + (i * sx_h + j * sx_w)[:, None] + (cc * sx_c)[None, :], mask=m2, other=0.0)
        tl.store(y_ptr + b64 * sy_b + (i * sy_h + j * sy_w)[:, None] + (cc * sy_c)[None, :],
                 (xt.to(tl.float32) * m[:, None]).to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def gate_bwd_kernel(dy_ptr, x_ptr, m_ptr, dx_ptr, dm_ptr, C, H, W,
                    sdy_b, sdy_c, sdy_h, sdy_w, sx_b, sx_c, sx_h, sx_w, sm_b, sm_h, sm_w,
                    sdx_b, sdx_c, sdx_h, sdx_w,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = dy * m; dm (B, H*W) fp32 = sum_c dy * x."""
    b64 = tl.program_id(1).to(tl.int64)
    pix, mask_p, i, j = _tile(tl.program_id(0), H * W, W, BLOCK_P)
    m = tl.load(m_ptr + b64 * sm_b + i * sm_h + j * sm_w, mask=mask_p, other=0.0).to(tl.float32)
    dm = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        m2 = mask_p[:, None] & (cc < C)[None, :]
        dyt = tl.load(dy_ptr + b64 * sdy_b + (i * sdy_h + j * sdy_w)[:, None] + (cc * sdy_c)[None, :],
                      mask=m2, other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + b64 * sx_b + (i * sx_h + j * sx_w)[:, None] + (cc * sx_c)[None, :],
                     mask=m2, other=0.0).to(tl.float32)
        dm += tl.sum(dyt * xt, axis=1)
        tl.store(dx_ptr + b64 * sdx_b + (i * sdx_h + j * sdx_w)[:, None] + (cc * sdx_c)[None, :],
                 (dyt * m[:, None]).to(dx_ptr.dtype.element_ty), mask=m2)
    tl.store(dm_ptr + b64 * H * W + pix, dm, mask=mask_p)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _geometry(x, g, ks):
    B, C, H, W = x.shape
    Ht, Wt = H // ks, W // ks
    h, w = g.shape[2:]
    interp = (h, w) != (Ht, Wt)
    # PyTorch's scale for a resize to a given size: input / output as a float
    return B, C, Ht, Wt, h, w, interp, float(h) / Ht, float(w) / Wt


def _common(x, g, wx, wg, ks):
    B, C, Ht, Wt, h, w, interp, sh, sw = _geometry(x, g, ks)
    F = wx.shape[0]
    cfg = blocks(F, x.dtype)
    scalars = (C, g.shape[1], F, Ht, Wt, h, w, sh, sw)
    strides = (*x.stride(), *g.stride())
    cx = dict(KS=ks, INTERP=interp, BLOCK_P=cfg["BLOCK_P"], BLOCK_K=cfg["BLOCK_K"], BLOCK_F=cfg["BLOCK_F"],
              PRECISION=dot_precision(x.dtype, x.device, like="conv"), num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"])
    return B, Ht * Wt, cfg, scalars, strides, cx


def attention_gate_fwd(x, g, wx, wg, bias, psi, psib, ks: int, logits):
    """logits (B, Ht*Wt) fp32. wx (F, C*ks*ks), wg (F, CG) contiguous in x's dtype; bias, psi (F,), psib (1,)
    fp32."""
    B, P, cfg, scalars, strides, cx = _common(x, g, wx, wg, ks)
    if B * P == 0:
        return logits
    with on_device(x):
        ag_fwd_kernel[(triton.cdiv(P, cfg["BLOCK_P"]), B)](x, g, wx, wg, bias, psi, psib, logits,
                                                          *scalars, *strides, **cx)
    return logits


def attention_gate_bwd(x, g, wx, wg, bias, psi, dlogits, ks: int, dx, dg):
    """dx (x's patches written), dg at theta's grid (B, CG, Ht, Wt), any strides."""
    B, P, cfg, scalars, strides, cx = _common(x, g, wx, wg, ks)
    if B * P == 0:
        return dx, dg
    with on_device(x):
        ag_bwd_kernel[(triton.cdiv(P, cfg["BLOCK_P"]), B)](x, g, wx, wg, bias, psi, dlogits, dx, dg,
                                                          *scalars, *strides, *dx.stride(), *dg.stride(), **cx)
    return dx, dg


def attention_gate_bwd_weight(x, g, wx, wg, bias, psi, dlogits, ks: int):
    """(dW (F, C*ks*ks + CG), dbias (F,), dpsi (F,)) fp32."""
    B, P, cfg, scalars, strides, cx = _common(x, g, wx, wg, ks)
    F, KX, CG = wx.shape[0], wx.shape[1], wg.shape[1]
    n_tiles = B * triton.cdiv(P, cfg["BLOCK_P"])
    n_kb = triton.cdiv(KX, BLOCK_K2) + triton.cdiv(CG, BLOCK_K2)
    dev = dict(device=x.device, dtype=torch.float32)
    if n_tiles == 0:
        return torch.zeros((F, KX + CG), **dev), torch.zeros((F,), **dev), torch.zeros((F,), **dev)
    kw = dict(BLOCK_K2=BLOCK_K2, **cx)

    def args(dw, dbias, dpsi, per):
        return (x, g, wx, wg, bias, psi, dlogits, dw, dbias, dpsi, *scalars, n_tiles, per, *strides)

    with on_device(x):
        nsplit, per = splits(ag_bwd_weight_kernel, args(dlogits, dlogits, dlogits, 2), kw, n_tiles, n_kb, x.device)
        dw = torch.empty((nsplit, F, KX + CG), **dev)  # every program writes its block of its split's row
        dbias = torch.empty((nsplit, F), **dev)
        dpsi = torch.empty((nsplit, F), **dev)
        ag_bwd_weight_kernel[(n_kb, nsplit)](*args(dw, dbias, dpsi, per), **kw)
    return dw.sum(0), dbias.sum(0), dpsi.sum(0)


def gate_fwd(x, m, y):
    B, C, H, W = x.shape
    if y.numel():
        with on_device(x):
            gate_fwd_kernel[(triton.cdiv(H * W, GATE_BLOCK_P), B)](
                x, m, y, C, H, W, *x.stride(), m.stride(0), m.stride(2), m.stride(3), *y.stride(),
                BLOCK_P=GATE_BLOCK_P, BLOCK_C=GATE_BLOCK_C, num_warps=4)
    return y


def gate_bwd(dy, x, m, dx, dm):
    """dx (x's shape), dm (B, H*W) fp32."""
    B, C, H, W = x.shape
    if B * H * W:
        with on_device(x):
            gate_bwd_kernel[(triton.cdiv(H * W, GATE_BLOCK_P), B)](
                dy, x, m, dx, dm, C, H, W, *dy.stride(), *x.stride(), m.stride(0), m.stride(2), m.stride(3),
                *dx.stride(), BLOCK_P=GATE_BLOCK_P, BLOCK_C=GATE_BLOCK_C, num_warps=4)
    return dx, dm


# ----------------------------------------------------------------------------------------------
# every configuration the launchers can pick
# ----------------------------------------------------------------------------------------------
def config_name(kind: str, dtype: torch.dtype, prec: str, cfg: dict, interp: bool) -> str:
    """The registered name of a logits kernel ("fwd", "bwd", "bwd_weight") configuration."""
    tag = DTYPES[dtype] + (f",{prec}" if dtype == torch.float32 else "")
    return (f"attention_gate.{kind}[{tag},F={cfg['BLOCK_F']}{',interp' if interp else ''},"
            f"P={cfg['BLOCK_P']},w={cfg['num_warps']}]")


def aot_configs() -> list:
    """Logits kernels for every F bucket (32..MAX_F), with and without resizing of g (theta's stride KS is a
    runtime argument), each dtype and fp32 precision; the gating kernels per dtype."""
    from .aot.registry import KernelConfig, signature

    configs = []
    scal = {"scale_h": "fp32", "scale_w": "fp32"}
    for dtype, dt in DTYPES.items():
        for prec in dot_precisions(dtype, like="conv"):
            for bucket in (32, 64, 128, 256):
                cfg = blocks(bucket, dtype)
                for interp in (False, True):
                    base = {"INTERP": interp, "BLOCK_P": cfg["BLOCK_P"], "BLOCK_K": cfg["BLOCK_K"],
                            "BLOCK_F": cfg["BLOCK_F"], "PRECISION": prec}
                    common = {"x_ptr": dt, "g_ptr": dt, "wx_ptr": dt, "wg_ptr": dt, "b_ptr": "fp32", "psi_ptr": "fp32"}
                    for kind, kernel, ptrs, cx in (
                            ("fwd", ag_fwd_kernel, {**common, "psib_ptr": "fp32", "logit_ptr": "fp32"}, base),
                            ("bwd", ag_bwd_kernel, {**common, "dlogit_ptr": "fp32", "dx_ptr": dt,
                                                    "dg_ptr": "fp32" if interp else dt}, base),
                            ("bwd_weight", ag_bwd_weight_kernel,
                             {**common, "dlogit_ptr": "fp32", "dw_ptr": "fp32", "dbias_ptr": "fp32",
                              "dpsi_ptr": "fp32"}, {**base, "BLOCK_K2": BLOCK_K2})):
                        configs.append(KernelConfig(
                            name=config_name(kind, dtype, prec, cfg, interp), kernel=kernel, constexprs=cx,
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                            signature=signature(kernel, ptrs=ptrs, scalars=scal,
                                                                           constexprs=cx)))
        cx = {"BLOCK_P": GATE_BLOCK_P, "BLOCK_C": GATE_BLOCK_C}
        for kind, kernel, ptrs in (("gate_fwd", gate_fwd_kernel, {"x_ptr": dt, "m_ptr": dt, "y_ptr": dt}),
                                   ("gate_bwd", gate_bwd_kernel, {"dy_ptr": dt, "x_ptr": dt, "m_ptr": dt,
                                                                  "dx_ptr": dt, "dm_ptr": "fp32"})):
            configs.append(KernelConfig(name=f"attention_gate.{kind}[{dt}]", kernel=kernel, constexprs=cx,
                                        num_warps=4, signature=signature(kernel, ptrs=ptrs, constexprs=cx)))
    return configs
