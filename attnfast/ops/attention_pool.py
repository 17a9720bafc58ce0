"""``attnfast::attention_pool``: attention pooling with a linear score as torch.library custom ops.

``attention_pool(l, weight, bias=None, g=None, *, normalize="softmax", reduce="sum") -> (c, pooled)`` computes
exactly ``attnfast.reference.attention_pool.attention_pool_reference``::

    c = conv1x1(l + g, weight, bias)                (B, 1, H, W): one logit per pixel
    a = softmax_hw(c)  or  sigmoid(c)               normalize="softmax" | "sigmoid"
    pooled = sum_hw(a * l)  or  mean_hw(a * l)      reduce="sum" | "mean"   (B, C)

Learn to Pay Attention's ``LinearAttentionBlock`` is ``(softmax, sum)`` / ``(sigmoid, mean)`` with a bias-free
``weight`` and ``g`` the global feature (B, C, 1, 1) or a map like ``l``; timm's ``GlobalContext`` pools with
``(softmax, sum)``, a bias and no ``g``.

Dispatch (``attnfast._dispatch.kernel_eligible``): CUDA tensors run ``attnfast.kernels.attention_pool`` (one pass
over ``l`` in the forward: logits, online softmax and the weighted sum); CPU tensors run a PyTorch path over
batch chunks. float64 always takes the PyTorch path.

Saved for backward: the inputs (already alive), the fp32 logits (B x H*W), the per-sample softmax max and sum
(B x 2) and the fp32 pooled output (B x C; the output itself for fp32 inputs): nothing C x H x W (eager keeps
``l + g`` and ``a * l``'s operands). The backward
is its own custom op (``attnfast::attention_pool_backward``) and recomputes ``a`` from the logits::

    ghat_p = s dpooled . l_p                         s = 1 (sum) or 1/(H*W) (mean)
    dc_p   = dc_out_p + a_p (ghat_p - dpooled . pooled)   (softmax)   dc_out_p + ghat_p a_p (1 - a_p)   (sigmoid)
    dl_p   = s a_p dpooled + dc_p w;   dg_p = dc_p w (a pooled g: sum over pixels);   dw = sum dc_p (l_p + g_p);
    dbias  = sum dc_p

NaN and inf propagate as in eager, forward and backward, on both paths: the softmax of a row holding a NaN or a
+inf, or of an all -inf row, is NaN (``exp(c - max) / sum`` as eager computes it), and a -inf logit gets
probability 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _alloc, _cpu_pool
from .._checks import check_feature_map, check_same, check_tensor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible

# The PyTorch path converts this many elements of l (B_chunk x C x H x W) to the compute dtype at a time; on CPU
# a chunk is an ``attnfast._cpu_pool`` task of at most CPU_CHUNK_ELEMENTS (one sample at least).
TORCH_CHUNK_ELEMENTS = 1 << 22
CPU_CHUNK_ELEMENTS = 1 << 20
NORMALIZE = ("softmax", "sigmoid")
REDUCE = ("sum", "mean")


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_attention_pool_inputs(l, weight, bias=None, g=None, normalize="softmax", reduce="sum") -> None:
    """ValueError for anything the op cannot compute (what was expected is in the message)."""
    B, C, H, W = check_feature_map(l, "l")
    check_tensor(weight, "weight")
    shape = tuple(weight.shape)
    if not (len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1) or len(shape) == 2 and shape[0] == 1
            or len(shape) == 1):
        raise ValueError(f"weight must be a 1x1 convolution weight to one channel, (1, C, 1, 1), (1, C) or (C,); "
                         f"got shape {shape}")
    if shape[-1 if len(shape) < 4 else 1] != C:
        raise ValueError(f"l must have {shape[-1 if len(shape) < 4 else 1]} channels (the weight's in_channels); "
                         f"got {C} (l's shape {tuple(l.shape)})")
    named = {"l": l, "weight": weight}
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.numel() != 1 or bias.dim() > 1:
            raise ValueError(f"bias must hold one value, shape (1,) or (); got shape {tuple(bias.shape)}")
        named["bias"] = bias
    if g is not None:
        check_tensor(g, "g", ndim=4)
        if tuple(g.shape) != (B, C, H, W) and not (g.shape[0] in (1, B) and tuple(g.shape[1:]) == (C, 1, 1)):
            raise ValueError(f"g must be the global feature, ({B}, {C}, 1, 1) (or (1, {C}, 1, 1)), or a map like l, "
                             f"({B}, {C}, {H}, {W}); got shape {tuple(g.shape)}")
        named["g"] = g
    check_same(named)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}; got {normalize!r}")
    if reduce not in REDUCE:
        raise ValueError(f"reduce must be one of {', '.join(REDUCE)}; got {reduce!r}")


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
def _spatial(g: Optional[torch.Tensor]) -> bool:
    return g is not None and tuple(g.shape[2:]) != (1, 1)


def _offset(l, ct, bias) -> torch.Tensor:
    """(B,) constant of the logits in the compute dtype: the bias (or 0). ``w . g`` is never split off for a pooled
    ``g``: the products are taken per element, ``w_c (l_c + g_c)``, so infinities meet as in eager."""
    if bias is None:
        return torch.zeros((l.shape[0],), device=l.device, dtype=ct)
    return bias.to(ct).reshape(1).expand(l.shape[0]).contiguous()


def _g_chunk(g, b0, b1):
    return g[b0:b1] if g.shape[0] != 1 else g


def _present(*tensors):
    return [t for t in tensors if t is not None]


def _chunks(B: int, per_sample: int, device: torch.device) -> list:
    return _cpu_pool.batch_chunks(B, per_sample, device, cpu_elems=CPU_CHUNK_ELEMENTS, elems=TORCH_CHUNK_ELEMENTS)


def _softmax_stats(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2): each row's max and ``sum(exp(logits - max))``, as eager softmax computes them (NaN where it gives
    NaN: a row holding a NaN or a +inf, or all -inf)."""
    m = logits.amax(1, keepdim=True)
    return torch.cat([m, torch.exp(logits - m).sum(1, keepdim=True)], 1)


def _attention(logits, stats, softmax: bool):
    return torch.exp(logits - stats[:, :1]) / stats[:, 1:] if softmax else torch.sigmoid(logits)


def _scale(l, mean: bool) -> float:
    return 1.0 / (l.shape[2] * l.shape[3]) if mean else 1.0


# ----------------------------------------------------------------------------------------------
# forward op
# ----------------------------------------------------------------------------------------------
def _torch_forward(l, w32, off, g, softmax, mean, c_out, pooled, logits, stats, pooled32):
    B, C, H, W = l.shape
    ct = w32.dtype
    chunks = _chunks(B, C * H * W, l.device)

    def logits_of(i):
        b0, b1 = chunks[i]
        x = l[b0:b1].to(ct)
        if g is not None:
            x = x + _g_chunk(g, b0, b1).to(ct)
        logits[b0:b1] = torch.einsum("bchw,c->bhw", x, w32).flatten(1) + off[b0:b1, None]

    _cpu_pool.run_chunks(logits_of, chunks, l.device)
    if softmax:
        stats.copy_(_softmax_stats(logits))
    else:
        stats.zero_()
    a = _attention(logits, stats, softmax) * _scale(l, mean)

    def pool(i):
        b0, b1 = chunks[i]
        pooled32[b0:b1] = torch.einsum("bchw,bhw->bc", l[b0:b1].to(ct), a[b0:b1].view(-1, H, W))

    _cpu_pool.run_chunks(pool, chunks, l.device)
    c_out.copy_(logits.view(B, 1, H, W))
    pooled.copy_(pooled32)


@torch.library.custom_op("attnfast::attention_pool", mutates_args=())
@autocast_off
def attention_pool_op(l: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], g: Optional[torch.Tensor],
                      softmax: bool, mean: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (c (B, 1, H, W), pooled (B, C), logits (B, HW), stats (B, 2): softmax max and sum, pooled32 (B, C));
    the last three in fp32 (fp64 for fp64)."""
    B, C, H, W = l.shape
    f32 = dict(device=l.device, dtype=compute_dtype(l))
    c_out = _alloc.empty((B, 1, H, W), device=l.device, dtype=l.dtype)
    pooled = _alloc.empty((B, C), device=l.device, dtype=l.dtype)
    logits = _alloc.empty((B, H * W), **f32)
    stats = _alloc.empty((B, 2), **f32)
    pooled32 = _alloc.empty((B, C), **f32)
    w32 = weight.reshape(C).to(f32["dtype"])
    off = _offset(l, f32["dtype"], bias)
    if kernel_eligible("attention_pool", *_present(l, weight, bias, g)):
        from ..kernels.attention_pool import attention_pool_fwd

        attention_pool_fwd(l, weight.reshape(C), off, g, softmax, mean, c_out, pooled, logits, stats, pooled32)
    else:
        _torch_forward(l, w32, off, g, softmax, mean, c_out, pooled, logits, stats, pooled32)
    return c_out, pooled, logits, stats, pooled32


@attention_pool_op.register_fake
def _(l, weight, bias, g, softmax, mean):
    B, C, H, W = l.shape
    ct = compute_dtype(l)
    return (l.new_empty((B, 1, H, W)), l.new_empty((B, C)), l.new_empty((B, H * W), dtype=ct),
            l.new_empty((B, 2), dtype=ct), l.new_empty((B, C), dtype=ct))


# ----------------------------------------------------------------------------------------------
# backward op
# ----------------------------------------------------------------------------------------------
def _torch_backward(l, w32, g, a, kvec, dc_out, dpooled, softmax, mean, dl, dg):
    """Writes dl (and dg for a map g); returns (dw (C,), dsum (B,), dg (B, C) for a pooled g) in the compute
    dtype."""
    B, C, H, W = l.shape
    ct = w32.dtype
    s = _scale(l, mean)
    dp = dpooled.to(ct)
    chunks = _chunks(B, C * H * W, l.device)
    dw_part = torch.empty((len(chunks), C), device=l.device, dtype=ct)  # added in chunk order afterwards
    dsum = torch.empty((B,), device=l.device, dtype=ct)
    pooled_g = g is not None and dg is None
    dgp = torch.empty((B, C), device=l.device, dtype=ct) if pooled_g else None

    def grads_of(i):
        b0, b1 = chunks[i]
        x = l[b0:b1].to(ct)
        ab = a[b0:b1].view(-1, 1, H, W)
        ghat = s * torch.einsum("bc,bchw->bhw", dp[b0:b1], x)[:, None]
        dco = dc_out[b0:b1].to(ct)
        dcb = dco + (ab * (ghat - kvec[b0:b1].view(-1, 1, 1, 1)) if softmax else ghat * ab * (1 - ab))
        dsum[b0:b1] = dcb.sum((1, 2, 3))
        dx = dcb * w32.view(1, C, 1, 1)
        dl[b0:b1] = s * ab * dp[b0:b1].view(-1, C, 1, 1) + dx
        if dg is not None:
            dg[b0:b1] = dx
        elif pooled_g:
            dgp[b0:b1] = dx.sum((2, 3))
        if g is not None:
            x = x + _g_chunk(g, b0, b1).to(ct)
        dw_part[i] = torch.einsum("bhw,bchw->c", dcb[:, 0], x)

    _cpu_pool.run_chunks(grads_of, chunks, l.device)
    dw = dw_part.sum(0)
    return dw, dsum, dgp


@torch.library.custom_op("attnfast::attention_pool_backward", mutates_args=())
@autocast_off
def attention_pool_backward_op(dc: torch.Tensor, dpooled: torch.Tensor, l: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], g: Optional[torch.Tensor], logits: torch.Tensor,
                               stats: torch.Tensor, pooled32: torch.Tensor, softmax: bool, mean: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dl, dweight, dbias, dg) from upstream (dc, dpooled); dbias / dg are empty when bias / g is None."""
    B, C, H, W = l.shape
    ct = logits.dtype
    w32 = weight.reshape(C).to(ct)
    kvec = (dpooled.to(ct) * pooled32).sum(1) if softmax else torch.zeros((B,), device=l.device, dtype=ct)
    spatial = _spatial(g)
    dl = _alloc.empty_like(l)
    dg_map = _alloc.empty_like(g) if spatial else None
    if kernel_eligible("attention_pool", *_present(l, weight, bias, g, dc, dpooled)):
        from ..kernels.attention_pool import attention_pool_bwd

        dw, dsum, dgp = attention_pool_bwd(l, weight.reshape(C), g, logits, stats, kvec, dc, dpooled, softmax, mean,
                                           dl, dg_map)
    else:
        a = _attention(logits, stats, softmax)
        dw, dsum, dgp = _torch_backward(l, w32, g, a, kvec, dc, dpooled, softmax, mean, dl, dg_map)
    if dgp is not None:  # a pooled g: sum_p dc_p w per element (and over the batch for a (1, C, 1, 1) g)
        dg = _alloc.empty_like(g)
        dg.copy_((dgp.sum(0, keepdim=True) if g.shape[0] != B else dgp).view(g.shape))
    else:
        dg = dg_map if spatial else l.new_empty((0,))
    dweight = _alloc.empty_like(weight)
    dweight.copy_(dw.view(weight.shape))
    if bias is not None:
        dbias = _alloc.empty_like(bias)
        dbias.copy_(dsum.sum().view(bias.shape))
    else:
        dbias = l.new_empty((0,))
    return dl, dweight, dbias, dg


@attention_pool_backward_op.register_fake
def _(dc, dpooled, l, weight, bias, g, logits, stats, pooled32, softmax, mean):
    return (torch.empty_like(l), torch.empty_like(weight),
            l.new_empty((0,)) if bias is None else torch.empty_like(bias),
            l.new_empty((0,)) if g is None else torch.empty_like(g))


def _setup_context(ctx, inputs, output):
    l, weight, bias, g, softmax, mean = inputs
    _, pooled, logits, stats, pooled32 = output
    # pooled32 (non-differentiable, B x C), never the user's pooled output: eager's sum/avg-pool save no output, so
    # a caller may modify pooled in place (dropout(inplace=True), relu_) and backward must still work
    ctx.save_for_backward(l, weight, bias, g, logits, stats, pooled32)
    ctx.args = (softmax, mean)
    ctx.mark_non_differentiable(logits, stats, pooled32)


def _backward(ctx, dc, dpooled, _dlogits, _dstats, _dpooled32):
    l, weight, bias, g, logits, stats, pooled32 = ctx.saved_tensors
    B, C, H, W = l.shape
    if dc is None:  # absent upstream gradient: a stride-0 zero, no memory
        dc = l.new_zeros(()).expand(B, 1, H, W)
    if dpooled is None:
        dpooled = l.new_zeros(()).expand(B, C)
    dl, dweight, dbias, dg = attention_pool_backward_op(dc, dpooled, l, weight, bias, g, logits, stats, pooled32,
                                                        *ctx.args)
    return dl, dweight, dbias if bias is not None else None, dg if g is not None else None, None, None


attention_pool_op.register_autograd(_backward, setup_context=_setup_context)


def attention_pool(l: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   g: Optional[torch.Tensor] = None, *, normalize: str = "softmax", reduce: str = "sum"):
    """Fused attention pooling with a linear score; returns ``(c, pooled)`` (see the module docstring).

    ``weight``: the 1x1 convolution to one channel, (1, C, 1, 1), (1, C) or (C,); ``bias``: one value or None;
    ``g``: None, (B or 1, C, 1, 1) or (B, C, H, W), added to ``l`` before the score (not pooled). Validates its
    inputs (ValueError)."""
    check_attention_pool_inputs(l, weight, bias, g, normalize, reduce)
    c, pooled, _, _, _ = attention_pool_op(l, weight, bias, g, normalize == "softmax", reduce == "mean")
    return c, pooled
