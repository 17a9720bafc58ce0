"""Fused CBAM (Woo et al., 2018): the five full-map passes of the channel + spatial gates.

With ``x`` of shape (B, C, H, W), ``P = H*W``, the channel gate ``s_c`` (B, C) and the spatial gate
``s_p`` (B, P) (both fp32, computed in torch from the small statistics these kernels return)::

    forward                                    backward (g = dL/dy)
    channel_pool:  sum_p x, max_p x            bwd_spatial:  sum_c g x s_c, #[x s_c == max_c x s_c], sum_p g x s_p
    spatial_pool:  sum_c x s_c, max_c x s_c    bwd_channel:  sum_p x (cm_p + cw_p [x s_c == pmax_p]), #[x == cmax]
    gate:          y = x s_c s_p               bwd_input:    dx = s_c (g s_p + cm_p + cw_p [x s_c == pmax_p])
                                                                    + ca_c + cu_c [x == cmax_c]

Every pass reads the map once; ``x s_c`` is never written. All kernels share one grid
(B, C-blocks, P-splits): a program owns ``BLOCK_C`` channels of one sample and a run of ``TILES``
pixel tiles of ``BLOCK_P``; each pass's split count comes from its kernel's occupancy (``plan``). Reductions over pixels are written as per-split partials (B, S, C),
reductions over channels as per-channel-block partials (B, NCB, P); torch reduces the partials.
Math is fp32 whatever the storage dtype. ``x``, ``g`` and the outputs are addressed through (batch,
channel, pixel) strides, so NCHW, channels_last and stride-0 gradients run without copies (a map
whose H and W cannot be flattened to one pixel stride is copied by the caller). The maxima are
compared exactly: the forward's maxima are values of ``x`` (or of the fp32 product ``x * s_c``,
recomputed bit-identically here), so tie masks and counts match eager's ``amax``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DTYPES, on_device, splits

NUM_WARPS = 4
TILE = 2048  # BLOCK_C * BLOCK_P
BLOCK_CS = (16, 32)  # channel tiles: 16 for C <= 16, else 32


@triton.jit
def _tile(pid_c, t, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask_p = offs_p < P
    return offs_c, offs_p, mask_c, mask_p, mask_c[:, None] & mask_p[None, :]


@triton.jit
def _program(C, BLOCK_C: tl.constexpr):
    """This program's sample (int64), channel block, pixel split, channels and channel mask."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_b, pid_c, tl.program_id(2), offs_c, offs_c < C


@triton.jit
def _load_bc(ptr, pid_b, C, offs_c, cmask):
    """Row ``pid_b`` of a contiguous fp32 (B, C) tensor at this program's channels."""
    return tl.load(ptr + pid_b * C + offs_c, mask=cmask, other=0.0)


@triton.jit
def _load_map(base, offs_c, offs_p, mask, sc, sp):
    return tl.load(base + offs_c[:, None] * sc + offs_p[None, :] * sp, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _nanmax(x, axis):
    """``tl.max`` that returns NaN where a NaN is reduced, as eager ``amax`` does (``tl.max`` skips NaN)."""
    return tl.max(x, axis=axis) + tl.sum(tl.where(x == x, 0.0, x), axis=axis)


@triton.jit
def _tie_term(x, xmax, coef):
    """``[x == xmax] * coef``: eager's max backward multiplies by the tie mask, so a non-finite ``coef``
    (the max was NaN: no ties, coef = d max / 0) gives NaN at every element, as in eager."""
    return (x == xmax).to(tl.float32) * coef


@triton.jit
def cbam_channel_pool_kernel(x_ptr, psum_ptr, pmax_ptr, C, P, TILES, S, sxb, sxc, sxp,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partial per-channel sum and max over this split's pixels -> psum/pmax (B, S, C)."""
    pid_b, pid_c, pid_s, offs_c, cmask = _program(C, BLOCK_C)
    x_b = x_ptr + pid_b * sxb
    acc_s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_m = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    for i in range(0, TILES):
        offs_c, offs_p, mask_c, mask_p, mask = _tile(pid_c, pid_s * TILES + i, C, P, BLOCK_C, BLOCK_P)
        x = _load_map(x_b, offs_c, offs_p, mask, sxc, sxp)
        acc_s += tl.sum(x, axis=1)
        acc_m = tl.maximum(acc_m, _nanmax(tl.where(mask, x, float("-inf")), 1), propagate_nan=tl.PropagateNan.ALL)
    out = (pid_b * S + pid_s) * C + offs_c
    tl.store(psum_ptr + out, acc_s, mask=cmask)
    tl.store(pmax_ptr + out, acc_m, mask=cmask)


@triton.jit
def cbam_spatial_pool_kernel(x_ptr, sc_ptr, psum_ptr, pmax_ptr, C, P, TILES, NCB, sxb, sxc, sxp,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partial per-pixel sum and max over this block's channels of ``x * s_c`` -> (B, NCB, P)."""
    pid_b, pid_c, pid_s, offs_c, cmask = _program(C, BLOCK_C)
    x_b = x_ptr + pid_b * sxb
    s_c = _load_bc(sc_ptr, pid_b, C, offs_c, cmask)
    out_b = (pid_b * NCB + pid_c) * P
    for i in range(0, TILES):
        offs_c, offs_p, mask_c, mask_p, mask = _tile(pid_c, pid_s * TILES + i, C, P, BLOCK_C, BLOCK_P)
        xs = _load_map(x_b, offs_c, offs_p, mask, sxc, sxp) * s_c[:, None]
        tl.store(psum_ptr + out_b + offs_p, tl.sum(xs, axis=0), mask=mask_p)
        tl.store(pmax_ptr + out_b + offs_p, _nanmax(tl.where(mask, xs, float("-inf")), 0), mask=mask_p)


@triton.jit
def cbam_gate_kernel(x_ptr, sc_ptr, sp_ptr, y_ptr, C, P, TILES, sxb, sxc, sxp, syb, syc, syp,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``y = x * s_c * s_p``."""
    pid_b, pid_c, pid_s, offs_c, cmask = _program(C, BLOCK_C)
    x_b = x_ptr + pid_b * sxb
    y_b = y_ptr + pid_b * syb
    s_c = _load_bc(sc_ptr, pid_b, C, offs_c, cmask)
    for i in range(0, TILES):
        offs_c, offs_p, mask_c, mask_p, mask = _tile(pid_c, pid_s * TILES + i, C, P, BLOCK_C, BLOCK_P)
        x = _load_map(x_b, offs_c, offs_p, mask, sxc, sxp)
        s_p = tl.load(sp_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        y = x * s_c[:, None] * s_p[None, :]
        tl.store(y_b + offs_c[:, None] * syc + offs_p[None, :] * syp, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cbam_bwd_spatial_kernel(g_ptr, x_ptr, sc_ptr, sp_ptr, pmax_ptr, dsp_ptr, pcnt_ptr, dsc_ptr,
                            C, P, TILES, S, NCB, sgb, sgc, sgp, sxb, sxc, sxp,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-pixel partials over this block's channels: ``sum_c g x s_c`` and the count of channels
    where ``x s_c`` equals the pixel's max -> (B, NCB, P); per-channel partial ``sum_p g x s_p`` over
    this split's pixels -> (B, S, C)."""
    pid_b, pid_c, pid_s, offs_c, cmask = _program(C, BLOCK_C)
    g_b = g_ptr + pid_b * sgb
    x_b = x_ptr + pid_b * sxb
    s_c = _load_bc(sc_ptr, pid_b, C, offs_c, cmask)
    out_b = (pid_b * NCB + pid_c) * P
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, TILES):
        offs_c, offs_p, mask_c, mask_p, mask = _tile(pid_c, pid_s * TILES + i, C, P, BLOCK_C, BLOCK_P)
        x = _load_map(x_b, offs_c, offs_p, mask, sxc, sxp)
        gx = _load_map(g_b, offs_c, offs_p, mask, sgc, sgp) * x
        s_p = tl.load(sp_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        pmax = tl.load(pmax_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        tie = mask & (x * s_c[:, None] == pmax[None, :])
        tl.store(dsp_ptr + out_b + offs_p, tl.sum(gx * s_c[:, None], axis=0), mask=mask_p)
        tl.store(pcnt_ptr + out_b + offs_p, tl.sum(tie.to(tl.float32), axis=0), mask=mask_p)
        acc += tl.sum(gx * s_p[None, :], axis=1)
    tl.store(dsc_ptr + (pid_b * S + pid_s) * C + offs_c, acc, mask=cmask)


@triton.jit
def cbam_bwd_channel_kernel(x_ptr, sc_ptr, cmax_ptr, cm_ptr, cw_ptr, pmax_ptr, dsc_ptr, ccnt_ptr,
                            C, P, TILES, S, sxb, sxc, sxp,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-channel partials over this split's pixels: ``sum_p x (cm_p + cw_p [x s_c == pmax_p])``
    and the count of pixels where ``x`` equals the channel's max -> (B, S, C)."""
    pid_b, pid_c, pid_s, offs_c, cmask = _program(C, BLOCK_C)
    x_b = x_ptr + pid_b * sxb
    s_c = _load_bc(sc_ptr, pid_b, C, offs_c, cmask)
    cmax = _load_bc(cmax_ptr, pid_b, C, offs_c, cmask)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, TILES):
        offs_c, offs_p, mask_c, mask_p, mask = _tile(pid_c, pid_s * TILES + i, C, P, BLOCK_C, BLOCK_P)
        x = _load_map(x_b, offs_c, offs_p, mask, sxc, sxp)
        cm = tl.load(cm_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        cw = tl.load(cw_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        pmax = tl.load(pmax_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        coef = cm[None, :] + _tie_term(x * s_c[:, None], pmax[None, :], cw[None, :])
        acc += tl.sum(x * coef, axis=1)
        cnt += tl.sum((mask & (x == cmax[:, None])).to(tl.float32), axis=1)
    out = (pid_b * S + pid_s) * C + offs_c
    tl.store(dsc_ptr + out, acc, mask=cmask)
    tl.store(ccnt_ptr + out, cnt, mask=cmask)


@triton.jit
def cbam_bwd_input_kernel(g_ptr, x_ptr, sc_ptr, sp_ptr, cm_ptr, cw_ptr, pmax_ptr, ca_ptr, cu_ptr, cmax_ptr,
                          dx_ptr, C, P, TILES, sgb, sgc, sgp, sxb, sxc, sxp, sdb, sdc, sdp,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``dx = s_c (g s_p + cm_p + cw_p [x s_c == pmax_p]) + ca_c + cu_c [x == cmax_c]``."""
    pid_b, pid_c, pid_s, offs_c, cmask = _program(C, BLOCK_C)
    g_b = g_ptr + pid_b * sgb
    x_b = x_ptr + pid_b * sxb
    dx_b = dx_ptr + pid_b * sdb
    s_c = _load_bc(sc_ptr, pid_b, C, offs_c, cmask)
    ca = _load_bc(ca_ptr, pid_b, C, offs_c, cmask)
    cu = _load_bc(cu_ptr, pid_b, C, offs_c, cmask)
    cmax = _load_bc(cmax_ptr, pid_b, C, offs_c, cmask)
    for i in range(0, TILES):
        offs_c, offs_p, mask_c, mask_p, mask = _tile(pid_c, pid_s * TILES + i, C, P, BLOCK_C, BLOCK_P)
        x = _load_map(x_b, offs_c, offs_p, mask, sxc, sxp)
        g = _load_map(g_b, offs_c, offs_p, mask, sgc, sgp)
        s_p = tl.load(sp_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        cm = tl.load(cm_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        cw = tl.load(cw_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        pmax = tl.load(pmax_ptr + pid_b * P + offs_p, mask=mask_p, other=0.0)
        dxs = g * s_p[None, :] + cm[None, :] + _tie_term(x * s_c[:, None], pmax[None, :], cw[None, :])
        dx = dxs * s_c[:, None] + ca[:, None] + _tie_term(x, cmax[:, None], cu[:, None])
        tl.store(dx_b + offs_c[:, None] * sdc + offs_p[None, :] * sdp, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def map_strides(t: torch.Tensor):
    """(batch, channel, pixel) strides of a 4-D map whose H and W flatten to one pixel index, else None."""
    _, _, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if W == 1:
        return sb, sc, sh
    if H == 1 or sh == W * sw:
        return sb, sc, sw
    return None


def blocks(C: int) -> tuple:
    """(BLOCK_C, BLOCK_P) for C channels: one of the registered tiles."""
    block_c = BLOCK_CS[0] if C <= BLOCK_CS[0] else BLOCK_CS[1]
    return block_c, TILE // block_c


def plan(x: torch.Tensor, kernel=None, args=None) -> dict:
    """Grid and tiles of one pass over ``x``: B x NCB channel blocks x S pixel splits of TILES tiles each.

    S comes from ``_launch.splits``: on CUDA from the real occupancy of ``kernel`` compiled for
    ``args(placeholder plan)`` (S = TILES = 2: the kernels specialize these integers, so a launch whose S or
    TILES is 1 or a multiple of 16 runs another binary of the same tiles, whose occupancy is taken to be the
    same), on the interpreter (or without a kernel) a few splits."""
    B, C, H, W = x.shape
    P = H * W
    block_c, block_p = blocks(C)
    ncb = triton.cdiv(C, block_c)
    pl = {"B": B, "C": C, "P": P, "NCB": ncb, "S": 2, "TILES": 2, "BLOCK_C": block_c, "BLOCK_P": block_p}
    warm = args(pl) if args is not None and x.device.type == "cuda" else ()
    pl["S"], pl["TILES"] = splits(kernel, warm, _consts(pl), triton.cdiv(P, block_p), B * ncb, x.device)
    return pl


def _grid(pl):
    return (pl["B"], pl["NCB"], pl["S"])


def _consts(pl):
    return {"BLOCK_C": pl["BLOCK_C"], "BLOCK_P": pl["BLOCK_P"], "num_warps": NUM_WARPS}


def _f32(*shape, device):
    return torch.empty(shape, device=device, dtype=torch.float32)


def _launch(kernel, x, args):
    """Plan the pass (``plan``) and launch ``kernel`` with ``args(pl)`` under ``x``'s device; returns ``pl``."""
    pl = plan(x, kernel, args)
    with on_device(x):
        kernel[_grid(pl)](*args(pl), **_consts(pl))
    return pl


def channel_pool(x: torch.Tensor):
    """(sum over pixels, max over pixels) of each channel, fp32 (B, C)."""
    out = {}

    def args(pl):
        psum = out["psum"] = _f32(pl["B"], pl["S"], pl["C"], device=x.device)
        pmax = out["pmax"] = _f32(pl["B"], pl["S"], pl["C"], device=x.device)
        return (x, psum, pmax, pl["C"], pl["P"], pl["TILES"], pl["S"], *map_strides(x))

    _launch(cbam_channel_pool_kernel, x, args)
    return out["psum"].sum(1), out["pmax"].amax(1)


def spatial_pool(x: torch.Tensor, s_c: torch.Tensor):
    """(sum over channels, max over channels) of ``x * s_c`` at each pixel, fp32 (B, P).
    ``s_c``: fp32 (B, C) contiguous."""
    out = {}

    def args(pl):
        psum = out["psum"] = _f32(pl["B"], pl["NCB"], pl["P"], device=x.device)
        pmax = out["pmax"] = _f32(pl["B"], pl["NCB"], pl["P"], device=x.device)
        return (x, s_c, psum, pmax, pl["C"], pl["P"], pl["TILES"], pl["NCB"], *map_strides(x))

    _launch(cbam_spatial_pool_kernel, x, args)
    return out["psum"].sum(1), out["pmax"].amax(1)


def gate(x: torch.Tensor, s_c: torch.Tensor, s_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Write ``x * s_c * s_p`` into ``y`` (flattenable like ``x``); gates fp32 (B, C), (B, P) contiguous."""
    _launch(cbam_gate_kernel, x, lambda pl: (x, s_c, s_p, y, pl["C"], pl["P"], pl["TILES"], *map_strides(x),
                                             *map_strides(y)))
    return y


def backward_spatial(g, x, s_c, s_p, pmax):
    """(sum_c g x s_c (B, P), tie count of max_c x s_c (B, P), sum_p g x s_p (B, C)), fp32."""
    out = {}

    def args(pl):
        B, C, P, S, NCB = pl["B"], pl["C"], pl["P"], pl["S"], pl["NCB"]
        dsp = out["dsp"] = _f32(B, NCB, P, device=x.device)
        pcnt = out["pcnt"] = _f32(B, NCB, P, device=x.device)
        dsc = out["dsc"] = _f32(B, S, C, device=x.device)
        return (g, x, s_c, s_p, pmax, dsp, pcnt, dsc, C, P, pl["TILES"], S, NCB, *map_strides(g), *map_strides(x))

    _launch(cbam_bwd_spatial_kernel, x, args)
    return out["dsp"].sum(1), out["pcnt"].sum(1), out["dsc"].sum(1)


def backward_channel(x, s_c, cmax, cm, cw, pmax):
    """(sum_p x (cm + cw [x s_c == pmax]) (B, C), tie count of max_p x (B, C)), fp32."""
    out = {}

    def args(pl):
        B, C, S = pl["B"], pl["C"], pl["S"]
        dsc = out["dsc"] = _f32(B, S, C, device=x.device)
        ccnt = out["ccnt"] = _f32(B, S, C, device=x.device)
        return (x, s_c, cmax, cm, cw, pmax, dsc, ccnt, C, pl["P"], pl["TILES"], S, *map_strides(x))

    _launch(cbam_bwd_channel_kernel, x, args)
    return out["dsc"].sum(1), out["ccnt"].sum(1)


def backward_input(g, x, s_c, s_p, cm, cw, pmax, ca, cu, cmax, dx):
    """Write the input gradient into ``dx`` (flattenable); every other operand fp32 contiguous."""
    _launch(cbam_bwd_input_kernel, x, lambda pl: (g, x, s_c, s_p, cm, cw, pmax, ca, cu, cmax, dx, pl["C"], pl["P"],
                                                  pl["TILES"], *map_strides(g), *map_strides(x),
                                                  *map_strides(dx)))
    return dx


# ----------------------------------------------------------------------------------------------
# AOT registry
# ----------------------------------------------------------------------------------------------
_MAPS = [  # (kernel, its full-map pointer arguments in the storage dtype); every other pointer is fp32
    (cbam_channel_pool_kernel, ("x_ptr",)),
    (cbam_spatial_pool_kernel, ("x_ptr",)),
    (cbam_gate_kernel, ("x_ptr", "y_ptr")),
    (cbam_bwd_spatial_kernel, ("g_ptr", "x_ptr")),
    (cbam_bwd_channel_kernel, ("x_ptr",)),
    (cbam_bwd_input_kernel, ("g_ptr", "x_ptr", "dx_ptr")),
]


def aot_configs() -> list:
    from .aot.registry import KernelConfig, arg_names, signature

    configs = []
    for kernel, maps in _MAPS:
        ptrs_f32 = [a for a in arg_names(kernel) if a.endswith("_ptr") and a not in maps]
        for dt in DTYPES.values():
            for block_c in BLOCK_CS:
                consts = {"BLOCK_C": block_c, "BLOCK_P": TILE // block_c}
                ptrs = {**{a: dt for a in maps}, **{a: "fp32" for a in ptrs_f32}}
                configs.append(KernelConfig(
                    name=f"cbam.{getattr(kernel, 'fn', kernel).__name__}[{dt},BLOCK_C={block_c}]", kernel=kernel,
                    signature=signature(kernel, ptrs=ptrs, constexprs=consts),
                    constexprs=consts, num_warps=NUM_WARPS))
    return configs
