"""``attnfast::cbam``: fused CBAM (channel gate, then spatial gate) as torch.library custom ops.

``cbam(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, running_mean, running_var, training, momentum,
eps, light)`` computes exactly timm's ``CbamModule`` (``light=False``; ``attnfast.reference.CBAM``) or
``LightCbamModule`` (``light=True``; ``attnfast.reference.LightCBAM``) with a ReLU MLP and sigmoid gates::

    s_c = sigmoid(fc2(relu(fc1(avg_p x))) + fc2(relu(fc1(max_p x))))        light: fc2(relu(fc1(avg/2 + max/2)))
    s_p = sigmoid(bn(conv([mean_c(x s_c), max_c(x s_c)])))                 light: conv(mean/2 + max/2)
    y   = x s_c s_p

The full-map work is five passes (``attnfast.kernels.cbam``): per-channel sum/max, per-pixel channel
mean/max of ``x s_c`` (``x s_c`` is never written), and ``y`` in the forward; in the backward, one pass
for the spatial gate's gradient, one for the channel gate's, one writing ``dx``. The MLP, the k x k
conv and the BatchNorm act on (B, C) and (B, 2, H, W) maps and run in torch (fp32; fp64 for fp64).
Dispatch (``attnfast._dispatch.kernel_eligible``): CUDA tensors run the Triton kernels, CPU tensors a PyTorch
path that saves the same tensors (its full-size temporaries live only inside each op call). float64
always takes the PyTorch path.

Saved for backward: ``x`` (the input, already alive) and small fp32 tensors only: the channel gate and
pooled statistics (B, C), the spatial gate and the channel-pooled map (B, 3, H, W in all), and the
BatchNorm mean/variance used. Nothing of size C x H x W besides ``x``.

Max pooling: the gradient of a maximum is split evenly among the elements equal to it (ties), exactly
as eager ``amax`` does (``grad * (x == max) / count``); timm's and the reference's CBAM use ``amax``, so
their gradients match ours tie for tie.

BatchNorm: with ``training`` (or without running statistics) the batch mean and biased variance
normalise, and ``running_mean`` / ``running_var`` are updated in place with the unbiased variance and
``momentum`` as ``F.batch_norm`` does; otherwise the running statistics normalise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _cpu_pool
from .._checks import check_feature_map, check_module_inputs, check_same, check_tensor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible

# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_cbam_inputs(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, running_mean, running_var,
                      light: bool) -> None:
    """ValueError for anything the op cannot compute (what was expected is in the message)."""
    B, C, H, W = check_feature_map(x, "x")
    named = {"channel.fc1.weight": fc1_w, "channel.fc2.weight": fc2_w, "spatial.conv.conv.weight": conv_w,
             "spatial.conv.bn.weight": bn_w, "spatial.conv.bn.bias": bn_b}
    for name, t in (("channel.fc1.bias", fc1_b), ("channel.fc2.bias", fc2_b),
                    ("spatial.conv.bn.running_mean", running_mean), ("spatial.conv.bn.running_var", running_var)):
        if t is not None:
            named[name] = t
    for name, t in named.items():
        check_tensor(t, name)
    check_same(named, dtype=False)
    # x and the weights share a device and, unless autocast is on (the 1x1 convs cast both), a dtype
    check_module_inputs({"x": x}, fc1_w, "channel.fc1.weight")
    R = fc1_w.shape[0]
    if fc1_w.dim() == 4 and tuple(fc1_w.shape[2:]) == (1, 1) and fc1_w.shape[1] != C:
        raise ValueError(f"x must have {fc1_w.shape[1]} channels (channel.fc1's in_channels); got {C} "
                         f"(shape {tuple(x.shape)})")
    if fc1_w.dim() != 4 or tuple(fc1_w.shape[1:]) != (C, 1, 1):
        raise ValueError(f"channel.fc1.weight must be a 1x1 conv weight ({R}, {C}, 1, 1) for x with {C} channels; "
                         f"got {tuple(fc1_w.shape)}")
    if tuple(fc2_w.shape) != (C, R, 1, 1):
        raise ValueError(f"channel.fc2.weight must be ({C}, {R}, 1, 1); got {tuple(fc2_w.shape)}")
    if fc1_b is not None and tuple(fc1_b.shape) != (R,):
        raise ValueError(f"channel.fc1.bias must have shape ({R},); got {tuple(fc1_b.shape)}")
    if fc2_b is not None and tuple(fc2_b.shape) != (C,):
        raise ValueError(f"channel.fc2.bias must have shape ({C},); got {tuple(fc2_b.shape)}")
    cin = 1 if light else 2
    k = conv_w.shape[-1]
    if conv_w.dim() != 4 or tuple(conv_w.shape[:3]) != (1, cin, k) or k % 2 == 0:
        raise ValueError(f"spatial.conv.conv.weight must be (1, {cin}, k, k) with an odd k; got {tuple(conv_w.shape)}")
    for name, t in (("spatial.conv.bn.weight", bn_w), ("spatial.conv.bn.bias", bn_b),
                    ("spatial.conv.bn.running_mean", running_mean), ("spatial.conv.bn.running_var", running_var)):
        if t is not None and t.numel() != 1:
            raise ValueError(f"{name} must have one element (one BatchNorm channel); got shape {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")


# ----------------------------------------------------------------------------------------------
# small pieces in torch: the channel MLP, the spatial conv + BatchNorm (compute dtype)
# ----------------------------------------------------------------------------------------------
# The forward follows the eager modules' own grouping and calls eager's own functions (the backward functions
# too), so that NaN and inf come out as in eager (the MLP's weight gradients: see ``_mlp_backward``): each
# branch's fc2 on its own rows (a relu output of 0 times an infinite fc2 weight is NaN in that branch), relu's
# gradient passing where its input is NaN (eager's threshold_backward), sigmoid_backward's grad (1 - y) y, and
# BatchNorm's statistics, affine form and backward from the kernels F.batch_norm picks on this device
# (``_batch_norm_impl_index``: native, cuDNN, ...).
def _mlp_params(fc1_w, fc1_b, fc2_w, fc2_b, ct) -> list:
    """[w1 (R, C), b1 or None, w2 (C, R), b2 or None] in the compute dtype."""
    return [None if t is None else (t.reshape(t.shape[0], -1) if t.dim() > 1 else t).to(ct)
            for t in (fc1_w, fc1_b, fc2_w, fc2_b)]


def _fc(v, w, b):
    return v @ w.T if b is None else v @ w.T + b


def _mlp_forward(avg, cmax, params, light: bool):
    """Channel gate s_c (B, C) from the pooled statistics, as timm's (Light)ChannelAttn groups it; the two
    branches' rows go through each layer in one matmul (its weights read once)."""
    w1, b1, w2, b2 = params
    if light:
        return torch.sigmoid(_fc(torch.relu(_fc(0.5 * avg + 0.5 * cmax, w1, b1)), w2, b2))
    B = avg.shape[0]
    out = _fc(torch.relu(_fc(torch.cat([avg, cmax]), w1, b1)), w2, b2)
    return torch.sigmoid(out[:B] + out[B:])


def _relu_grad(pre, grad):
    """Eager relu's backward (``threshold_backward`` on its output): 0 where pre <= 0, else (NaN too) grad."""
    return torch.where(pre <= 0, 0.0, grad)


def _mlp_backward(ds_c, s_c, avg, cmax, params, light: bool):
    """(d avg, d cmax, d w1 (R, C), d b1, d w2 (C, R), d b2) from d s_c (compute dtype), with the two branches'
    rows stacked: one matmul per product, each weight read (and each weight gradient written) once. A weight or
    bias gradient sums both branches in one reduction where eager's autograd adds two, so its last bits can
    differ from eager's, and where the two branches' partial sums overflow with opposite signs eager gets NaN
    (inf - inf) where this can get inf; otherwise NaN and inf reach the same elements."""
    w1, b1, w2, b2 = params
    do = ds_c * (1 - s_c) * s_c
    if light:
        v = 0.5 * avg + 0.5 * cmax
        pre = _fc(v, w1, b1)
        dpre = _relu_grad(pre, do @ w2)
        dv = dpre @ w1
        return 0.5 * dv, 0.5 * dv, dpre.T @ v, dpre.sum(0), do.T @ torch.relu(pre), do.sum(0)
    B = avg.shape[0]
    v = torch.cat([avg, cmax])
    pre = _fc(v, w1, b1)
    dh = do @ w2
    dpre = _relu_grad(pre, torch.cat([dh, dh]))
    dv = dpre @ w1
    return dv[:B], dv[B:], dpre.T @ v, dpre.sum(0), torch.cat([do, do]).T @ torch.relu(pre), 2 * do.sum(0)


def _conv_input(smap: torch.Tensor, H: int, W: int, light: bool) -> torch.Tensor:
    """The conv's input from smap = (channel mean, channel max) of x s_c, (B, 2, P)."""
    B = smap.shape[0]
    if light:
        return (0.5 * smap[:, 0] + 0.5 * smap[:, 1]).view(B, 1, H, W)
    return smap.view(B, 2, H, W)


def _conv(inp, conv_w):
    return F.conv2d(inp, conv_w, padding=conv_w.shape[-1] // 2)


def _batch_norm(z, w, b, running_mean, running_var, train: bool, momentum: float, eps: float):
    """What F.batch_norm runs: (out, save_mean, save_var_transform, reserve, impl_index)."""
    return torch.ops.aten._batch_norm_impl_index(z, w, b, running_mean, running_var, train, momentum, eps,
                                                 torch.backends.cudnn.enabled)


def _bn_forward(z, bn_w, bn_b, running_mean, running_var, batch_stats: bool, eps: float):
    """(normalized z, bnstat): bnstat = [batch mean, unbiased batch variance] with batch statistics (what
    F.batch_norm puts into running statistics), else [running mean, running var]."""
    ct = z.dtype
    w, b = bn_w.to(ct).reshape(1), bn_b.to(ct).reshape(1)
    if batch_stats:  # momentum 1: F.batch_norm writes its own batch statistics into fresh buffers
        bnstat = torch.stack([z.new_zeros(()), z.new_ones(())])
        return _batch_norm(z, w, b, bnstat[0:1], bnstat[1:2], True, 1.0, eps)[0], bnstat
    bnstat = torch.stack([running_mean.to(ct).reshape(()), running_var.to(ct).reshape(())])
    return _batch_norm(z, w, b, bnstat[0:1], bnstat[1:2], False, 0.0, eps)[0], bnstat


def _spatial_backward(da, inp, conv_w, bn_w, bnstat, batch_stats: bool, eps: float):
    """(d inp, d conv_w, d bn_w, d bn_b) from d(BatchNorm output): the conv and BatchNorm recomputed on the
    small map and differentiated by their own backward functions, as eager's autograd calls them."""
    ct = inp.dtype
    w, bw = conv_w.to(ct), bn_w.to(ct).reshape(1)
    pad = conv_w.shape[-1] // 2
    z = F.conv2d(inp, w, padding=pad)
    rm, rv = (None, None) if batch_stats else (bnstat[0:1], bnstat[1:2])
    _, save_mean, save_var, reserve, impl = _batch_norm(z, bw, torch.zeros_like(bw), rm, rv, batch_stats, 0.0, eps)
    if batch_stats:
        dz, dbn_w, dbn_b = torch.ops.aten._batch_norm_impl_index_backward(
            impl, z, da.contiguous(), bw, rm, rv, save_mean, save_var, True, eps, [True, True, True], reserve)
    else:  # running statistics: eager's derivative of every implementation (cuDNN's too) is the native one
        dz, dbn_w, dbn_b = torch.ops.aten.native_batch_norm_backward(
            da.contiguous(), z, bw, rm, rv, None, None, False, eps, [True, True, True])
    dinp, dconv_w, _ = torch.ops.aten.convolution_backward(
        dz, inp, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, False])
    return dinp, dconv_w, dbn_w, dbn_b


# ----------------------------------------------------------------------------------------------
# the full-map passes of the PyTorch path (the Triton path is attnfast.kernels.cbam)
# ----------------------------------------------------------------------------------------------
def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when H and W flatten to one pixel stride (NCHW, channels_last, stride 0), else a copy."""
    from ..kernels.cbam import map_strides

    return t if map_strides(t) is not None else t.contiguous()


def _bc(v):  # (B, C) -> (B, C, 1, 1)
    return v[:, :, None, None]


def _bp(v, H, W):  # (B, P) -> (B, 1, H, W)
    return v.view(v.shape[0], 1, H, W)


# The PyTorch path runs the same passes as the kernels, in torch ops, per chunk of samples: on CPU each chunk is a
# task for ``attnfast._cpu_pool``'s single-threaded workers, so a sample's passes run while it is in the worker's
# cache and no op waits for every thread on busy cores. Between the chunk phases run the batch-wide small parts
# (the channel MLP forward and backward, the conv and BatchNorm on (B, 2, H, W) maps), single-threaded on one
# worker (``_cpu_pool.small``). Its full-size temporaries live inside one op call and are never saved for backward.
# Elements of x per CPU task (whole samples, at least one): at most CPU_CHUNK_ELEMENTS, and at least
# CPU_MIN_CHUNK_ELEMENTS where the batch has them (``_cpu_pool.batch_chunks``), so the ResNet stages at B=8 make few
# tasks (2048x7x7: one, run in the calling thread; 1024x14x14: 6 + 2 samples; 512x28x28: 3 + 3 + 2; 256x56x56: four
# of 2). Measured on 2 cores only: with many workers the floor leaves some idle at the small stages. In-process A/B of
# fwd+bwd at B=8 (median of 14 steps, 2 cores, torch 2.14.1, 2026-12-03, not committed), quiet / 1 busy process,
# 2048x7x7, 1024x14x14, 512x28x28, 256x56x56: floor 2**16 13.6/15.4, 14.8/16.6, 22.0/24.1, 41.9/61.6 ms; floor
# 2**20 11.5/13.5, 13.8/15.6, 20.4/22.9, 44.4/50.0 ms; eager 15.2/25.5, 20.5/37.3, 34.2/64.4, 107/296 ms.
CPU_CHUNK_ELEMENTS = 1 << 21
CPU_MIN_CHUNK_ELEMENTS = 1 << 20


def _sample_chunks(x) -> list:
    """(b0, b1) sample ranges (``attnfast._cpu_pool.batch_chunks``); on CUDA the whole batch."""
    return _cpu_pool.batch_chunks(x.shape[0], x[0].numel(), x.device, cpu_elems=CPU_CHUNK_ELEMENTS,
                                  elems=max(1, x.numel()), min_elems=CPU_MIN_CHUNK_ELEMENTS)


def _torch_forward_maps(x, ct, mlp, chunks):
    """(sums, cmax, s_c, psum, pmax, x s_c): the channel pooling pass per chunk, the MLP on the whole batch (its
    weights read once, not once per chunk), then the spatial pooling pass per chunk; ``mlp(sums, cmax) -> s_c``."""
    B, C, H, W = x.shape
    P = H * W
    sums, cmax = (torch.empty((B, C), dtype=ct, device=x.device) for _ in range(2))
    psum, pmax = (torch.empty((B, P), dtype=ct, device=x.device) for _ in range(2))
    # in the compute dtype (type promotion); when that is x's dtype, x s_c is written where y goes and the
    # gate pass scales it in place (one full-size allocation per call, as eager's y)
    xs = _alloc.empty_like(x) if x.dtype == ct else torch.empty_like(x, dtype=ct)

    def channel_pool(i):
        b0, b1 = chunks[i]
        xb = x[b0:b1]
        sums[b0:b1] = xb.sum((2, 3), dtype=ct)
        cmax[b0:b1] = xb.amax((2, 3))

    _cpu_pool.run_chunks(channel_pool, chunks, x.device)
    s_c = _cpu_pool.small(lambda: mlp(sums, cmax), x.device)

    def spatial_pool(i):
        b0, b1 = chunks[i]
        n = b1 - b0
        xsb = torch.mul(x[b0:b1], _bc(s_c[b0:b1]), out=xs[b0:b1])
        psum[b0:b1] = torch.bmm(xsb.new_ones(n, 1, C), xsb.reshape(n, C, -1)).view(n, -1)  # a matmul sums over
        pmax[b0:b1] = xsb.amax(1).flatten(1)  # C faster than sum(1)

    _cpu_pool.run_chunks(spatial_pool, chunks, x.device)
    return sums, cmax, s_c, psum, pmax, xs


# Tie masks are written as 1.0 / 0.0 in the compute dtype (``torch.eq`` into a float tensor, in place where
# the operand is dead): a float mask multiplies, adds and sums with no bool -> float conversion pass.
def _torch_backward_spatial(g, x, s_c, pmax):
    """(sum_c g x s_c (B, P), tie count of max_c x s_c (B, P), state for ``_torch_backward_channel``), for a chunk."""
    B, C, H, W = x.shape
    P = H * W
    ct = s_c.dtype
    xc, gc = x.to(ct).reshape(B, C, P), g.to(ct).reshape(B, C, P)
    xs = x.reshape(B, C, P) * s_c.view(B, C, 1)  # the forward's x s_c, bit for bit (promoted to ct)
    gx = torch.mul(gc, xc)
    dsp = torch.bmm(s_c.view(B, 1, C), gx).view(B, P)
    tie_p = xs.eq_(pmax.view(B, 1, P))  # 1.0 where x s_c is its pixel's channel maximum
    return dsp, tie_p.sum(1), [gc, xc, tie_p, gx]


def _torch_backward_channel(state, s_p, cm, cw, cmax):
    """For a chunk: the gradient at x s_c, dxs = g s_p + cm + tie_p cw (in tie_p's memory), and d s_c =
    sum_p dxs x; leaves tie_c (x equals its channel's maximum) where g x was."""
    gc, xc, dxs, buf = state
    B, C, P = xc.shape
    torch.addcmul(cm.view(B, 1, P), dxs, cw.view(B, 1, P), out=dxs).addcmul_(gc, s_p.view(B, 1, P))
    torch.mul(dxs, xc, out=buf)  # g x is dead: its memory holds dxs x
    ds_c = buf.sum(2)
    torch.eq(xc, cmax.view(B, C, 1), out=buf)  # cmax is x's own maximum, exact in ct
    return ds_c


def _torch_backward_input(state, s_c, davg, dcmax, dx):
    """For a chunk: dx = dxs s_c + d avg / P + tie_c d cmax / count."""
    _, _, dxs, tie_c = state
    B, C, P = dxs.shape
    dx3 = dx.view(B, C, P)  # dx is laid out as x, whose pixels flatten to one stride
    out = dx3 if dx.dtype == dxs.dtype else dxs
    torch.addcmul((davg / P).view(B, C, 1), dxs, s_c.view(B, C, 1), out=out)
    out.addcmul_(tie_c, (dcmax / tie_c.sum(2)).view(B, C, 1))
    if out is not dx3:
        dx3.copy_(out)


# ----------------------------------------------------------------------------------------------
# forward op
# ----------------------------------------------------------------------------------------------
def _small_shapes(x):
    B, C, H, W = x.shape
    return (B, C), (B, 2, C), (B, H * W), (B, 2, H * W), (2,)


@torch.library.custom_op("attnfast::cbam", mutates_args=())
@autocast_off
def cbam_op(x: torch.Tensor, fc1_w: torch.Tensor, fc1_b: Optional[torch.Tensor], fc2_w: torch.Tensor,
            fc2_b: Optional[torch.Tensor], conv_w: torch.Tensor, bn_w: torch.Tensor, bn_b: torch.Tensor,
            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
            batch_stats: bool, light: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, s_c (B, C), cstat (B, 2, C) = [avg, max] over pixels, s_p (B, P),
    smap (B, 2, P) = [mean, max] over channels of x s_c, bnstat (2,) = [mean, var]: the batch mean and unbiased
    variance with batch statistics (what goes into the running statistics), else the running statistics);
    all but y in the compute dtype (fp32; fp64 for fp64)."""
    x = _flat(x)
    B, C, H, W = x.shape
    P = H * W
    ct = compute_dtype(x)
    triton_path = kernel_eligible("cbam", x, fc1_w, fc2_w, conv_w, bn_w, bn_b)

    params = _mlp_params(fc1_w, fc1_b, fc2_w, fc2_b, ct)

    def mlp(sums, cmax):
        return _mlp_forward(sums / P, cmax, params, light).contiguous()

    if triton_path:
        from ..kernels import cbam as K

        sums, cmax = K.channel_pool(x)
        s_c = mlp(sums, cmax)
        psum, pmax = K.spatial_pool(x, s_c)
    else:
        chunks = _sample_chunks(x)
        sums, cmax, s_c, psum, pmax, xs = _torch_forward_maps(x, ct, mlp, chunks)
    def spatial_gate():  # on (B, 2, H, W) maps
        smap = torch.stack([psum / C, pmax], 1)
        z = _conv(_conv_input(smap, H, W, light), conv_w.to(ct))
        zn, bnstat = _bn_forward(z, bn_w, bn_b, running_mean, running_var, batch_stats, eps)
        return smap, torch.sigmoid(zn).view(B, P), bnstat

    smap, s_p, bnstat = spatial_gate() if triton_path else _cpu_pool.small(spatial_gate, x.device)
    if triton_path:
        y = _alloc.empty_like(x)
        K.gate(x, s_c, s_p, y)
    else:  # _torch_forward_maps wrote x s_c in y's memory when they share a dtype
        y = xs if xs.dtype == x.dtype else _alloc.empty_like(x)

        def gate(i):
            b0, b1 = chunks[i]
            torch.mul(xs[b0:b1], _bp(s_p[b0:b1], H, W), out=y[b0:b1])

        _cpu_pool.run_chunks(gate, chunks, x.device)
    return y, s_c, torch.stack([sums / P, cmax], 1), s_p, smap, bnstat


@cbam_op.register_fake
def _(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, running_mean, running_var, eps, batch_stats, light):
    ct = compute_dtype(x)
    y = torch.empty_like(_flat(x))
    return (y, *(x.new_empty(s, dtype=ct) for s in _small_shapes(x)))


# ----------------------------------------------------------------------------------------------
# backward op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("attnfast::cbam_backward", mutates_args=())
@autocast_off
def cbam_backward_op(grad: torch.Tensor, x: torch.Tensor, fc1_w: torch.Tensor, fc1_b: Optional[torch.Tensor],
                     fc2_w: torch.Tensor, fc2_b: Optional[torch.Tensor], conv_w: torch.Tensor, bn_w: torch.Tensor,
                     s_c: torch.Tensor, cstat: torch.Tensor, s_p: torch.Tensor, smap: torch.Tensor,
                     bnstat: torch.Tensor, eps: float, batch_stats: bool, light: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, d fc1_w, d fc1_b, d fc2_w, d fc2_b, d conv_w, d bn_w, d bn_b); the bias gradients
    are zeros of the bias shape when a bias is None."""
    x = _flat(x)
    g = _flat(grad)
    B, C, H, W = x.shape
    P = H * W
    ct = s_c.dtype
    mlp_args = _mlp_params(fc1_w, fc1_b, fc2_w, fc2_b, ct)
    triton_path = kernel_eligible("cbam", x, g, fc1_w, fc2_w, conv_w, bn_w)
    pmax = smap[:, 1].contiguous()
    if triton_path:
        from ..kernels import cbam as K

        dsp, pcnt, dsc_gate = K.backward_spatial(g, x, s_c, s_p, pmax)
    else:
        chunks = _sample_chunks(x)
        states = [None] * len(chunks)
        dsp, pcnt = (torch.empty((B, P), dtype=ct, device=x.device) for _ in range(2))

        def spatial(i):
            b0, b1 = chunks[i]
            dsp[b0:b1], pcnt[b0:b1], states[i] = _torch_backward_spatial(g[b0:b1], x[b0:b1], s_c[b0:b1],
                                                                           pmax[b0:b1])

        _cpu_pool.run_chunks(spatial, chunks, x.device)

    def spatial_gate():  # sigmoid (eager's sigmoid_backward: grad (1 - y) y) -> BatchNorm -> conv, (B, 1, H, W) maps
        da = (dsp * (1 - s_p) * s_p).view(B, 1, H, W)
        dinp, dconv_w, dbn_w, dbn_b = _spatial_backward(da, _conv_input(smap, H, W, light), conv_w, bn_w, bnstat,
                                                        batch_stats, eps)
        dinp = dinp.view(B, -1, P)
        if light:
            dmean_p = dmax_p = 0.5 * dinp[:, 0]
        else:
            dmean_p, dmax_p = dinp[:, 0], dinp[:, 1]
        return (dmean_p / C).contiguous(), (dmax_p / pcnt).contiguous(), dconv_w, dbn_w, dbn_b

    cm, cw, dconv_w, dbn_w, dbn_b = spatial_gate() if triton_path else _cpu_pool.small(spatial_gate, x.device)

    dx = _alloc.empty_like(x)
    if triton_path:
        dsc_sp, ccnt = K.backward_channel(x, s_c, cstat[:, 1].contiguous(), cm, cw, pmax)
        avg, cmax = cstat[:, 0], cstat[:, 1]
        davg, dcmax, *wgrads = _mlp_backward(dsc_gate + dsc_sp, s_c, avg, cmax, mlp_args, light)
        K.backward_input(g, x, s_c, s_p, cm, cw, pmax, (davg / P).contiguous(), (dcmax / ccnt).contiguous(),
                         cmax.contiguous(), dx)
    else:
        ds_c = torch.empty((B, C), dtype=ct, device=x.device)
        cmax = cstat[:, 1]

        def channel(i):
            b0, b1 = chunks[i]
            ds_c[b0:b1] = _torch_backward_channel(states[i], s_p[b0:b1], cm[b0:b1], cw[b0:b1], cmax[b0:b1])

        _cpu_pool.run_chunks(channel, chunks, x.device)
        davg, dcmax, *wgrads = _cpu_pool.small(
            lambda: _mlp_backward(ds_c, s_c, cstat[:, 0], cmax, mlp_args, light), x.device)

        def dinput(i):
            b0, b1 = chunks[i]
            _torch_backward_input(states[i], s_c[b0:b1], davg[b0:b1], dcmax[b0:b1], dx[b0:b1])

        _cpu_pool.run_chunks(dinput, chunks, x.device)
    dw1, db1, dw2, db2 = wgrads
    outs = [dx]
    for grad_v, like in ((dw1, fc1_w), (db1, fc1_b), (dw2, fc2_w), (db2, fc2_b), (dconv_w, conv_w),
                         (dbn_w, bn_w), (dbn_b, bn_w)):
        shape = grad_v.shape if like is None else like.shape
        dtype = fc1_w.dtype if like is None else like.dtype
        out = _alloc.empty(shape, device=x.device, dtype=dtype)
        outs.append(out.copy_(grad_v.reshape(shape)))
    return tuple(outs)


@cbam_backward_op.register_fake
def _(grad, x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, s_c, cstat, s_p, smap, bnstat, eps, batch_stats, light):
    R, C = fc1_w.shape[0], fc1_w.shape[1]
    b1 = fc1_w.new_empty((R,)) if fc1_b is None else torch.empty_like(fc1_b)
    b2 = fc2_w.new_empty((C,)) if fc2_b is None else torch.empty_like(fc2_b)
    return (torch.empty_like(_flat(x)), torch.empty_like(fc1_w), b1, torch.empty_like(fc2_w), b2,
            torch.empty_like(conv_w), torch.empty_like(bn_w), torch.empty_like(bn_w))


def _setup_context(ctx, inputs, output):
    x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, running_mean, running_var, eps, batch_stats, light = inputs
    _, s_c, cstat, s_p, smap, bnstat = output
    ctx.save_for_backward(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, s_c, cstat, s_p, smap, bnstat)
    ctx.has_bias = (fc1_b is not None, fc2_b is not None)
    ctx.args = (eps, batch_stats, light)
    ctx.mark_non_differentiable(s_c, cstat, s_p, smap, bnstat)


def _backward(ctx, dy, *_unused):
    x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, s_c, cstat, s_p, smap, bnstat = ctx.saved_tensors
    if dy is None:  # absent upstream gradient: a stride-0 zero, no memory
        dy = x.new_zeros(()).expand(x.shape)
    dx, dw1, db1, dw2, db2, dconv, dbn_w, dbn_b = cbam_backward_op(
        dy, x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, s_c, cstat, s_p, smap, bnstat, *ctx.args)
    db1 = db1 if ctx.has_bias[0] else None
    db2 = db2 if ctx.has_bias[1] else None
    return dx, dw1, db1, dw2, db2, dconv, dbn_w, dbn_b, None, None, None, None, None


cbam_op.register_autograd(_backward, setup_context=_setup_context)


def cbam(x: torch.Tensor, fc1_w: torch.Tensor, fc1_b: Optional[torch.Tensor], fc2_w: torch.Tensor,
         fc2_b: Optional[torch.Tensor], conv_w: torch.Tensor, bn_w: torch.Tensor, bn_b: torch.Tensor,
         running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
         training: bool = False, momentum: float = 0.1, eps: float = 1e-5, light: bool = False) -> torch.Tensor:
    """Fused CBAM; see the module docstring. Arguments follow ``F.batch_norm`` for the BatchNorm: with
    ``training`` (or no running statistics) the batch statistics normalise and the running ones (if
    given) are updated in place with ``momentum``. Validates its inputs (ValueError)."""
    check_cbam_inputs(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, running_mean, running_var, light)
    batch_stats = bool(training) or running_mean is None
    n = x.shape[0] * x.shape[2] * x.shape[3]
    if batch_stats and n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                         "(the spatial gate's BatchNorm has one value: use eval mode or a larger input)")
    y, _, _, _, _, bnstat = cbam_op(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, running_mean, running_var,
                                    float(eps), batch_stats, bool(light))
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(bnstat[0].to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(bnstat[1].to(running_var.dtype), alpha=momentum)
    return y
