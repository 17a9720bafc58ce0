"""``attnfast::attention_gate``: the Attention U-Net gate (MONAI ``AttentionBlock``, Attention-Gated-Networks'
``GridAttentionBlock2D``) without its F_int x H x W intermediate.

The gate is split where its tensors are small:

- ``attention_gate_logits(x, g, w_x, w_g, bias, psi_w, psi_b, stride) -> logits`` (B, 1, H // k, W // k),
  fp32 (fp64 for fp64), the custom op ``attnfast::attention_gate_logits``::

      z = conv_k(x; w_x, stride k) + w_g up(g) + bias     (F_int channels: never in memory)
      logits = psi_w . relu(z) + psi_b

  ``up`` resizes ``w_g g + bias`` bilinearly to theta's grid (align_corners=False; identity when the sizes
  agree). The PyTorch path does exactly that; the kernels resize g and then project (a 1x1 conv commutes
  with the resize: its taps sum to 1), adding the bias through the same taps. Backward
  (``attnfast::attention_gate_logits_backward``) recomputes z.
- what turns the one-channel logits into the map (BatchNorm, sigmoid, softmax over space, resizing) is
  plain PyTorch on (B, 1, h, w) tensors, with autograd;
- ``gate(x, m) -> x * m`` (``attnfast::attention_gate_mul``): one pass forward; backward one pass over
  dy and x for ``dx = dy m`` and ``dm = sum_c dy x``.

BatchNorm after a 1x1 projection is affine in it, so the modules fold it into the op's weights:
``projection_stats`` gives the batch mean/variance of ``W v + b`` per channel from v's channel moments
(``channel_moments``: mean and C x C covariance, computed over batch chunks, nothing saved but v), and
``fold_batch_norm`` gives ``W s`` and ``(b - mu) s + beta`` with ``s = gamma / sqrt(var + eps)``. Autograd
through this small torch graph gives BatchNorm's exact training gradients.

Dispatch (``attnfast._dispatch.kernel_eligible``): CUDA tensors run ``attnfast.kernels.attention_gate``;
CPU tensors a PyTorch path that keeps the memory behaviour (z exists one batch chunk at a time, in
forward and in the recomputing backward). float64, and F_int > ``MAX_F``, take the PyTorch path.
fp32 dots use TF32 exactly when eager fp32 convolutions would (``kernels._launch.dot_precision``, like="conv").
NaN and inf propagate as in eager, forward and backward (relu keeps NaN; its gradient passes NaN), with one
documented difference on the kernels: where g is resized, a non-finite ``w_g`` meets the resize's zero-weight
taps in eager (0 * inf = NaN) but not in the kernels (which resize g first): there eager has NaN and the kernels
+-inf or a finite value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _alloc, _cpu_pool
from .._checks import check_same, check_tensor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible
from ..kernels._launch import w2d

TORCH_CHUNK_ELEMENTS = 1 << 22  # z elements (b x F x Ht x Wt) the PyTorch path holds at a time
CPU_CHUNK_ELEMENTS = 1 << 20  # on CPU, per attnfast._cpu_pool task (one sample at least)
CPU_INFLIGHT_ELEMENTS = 1 << 24  # on CPU, z elements of the tasks running at once (one task at least)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_attention_gate_inputs(x, g, w_x, w_g, bias, psi_w, psi_b, stride) -> None:
    """ValueError for anything the op cannot compute (what was expected is in the message)."""
    check_tensor(x, "x", ndim=4)
    check_tensor(g, "g", ndim=4)
    if isinstance(stride, bool) or int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer; got {stride!r}")
    k = int(stride)
    check_tensor(w_x, "w_x", ndim=4)
    if tuple(w_x.shape[2:]) != (k, k):
        raise ValueError(f"w_x must be a {k}x{k} convolution weight (F_int, C, {k}, {k}) for stride {k}; "
                         f"got {tuple(w_x.shape)}")
    if w_x.shape[1] != x.shape[1]:
        raise ValueError(f"x must have {w_x.shape[1]} channels (w_x's in_channels); got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    fi = w_x.shape[0]
    check_tensor(w_g, "w_g")
    if w_g.dim() not in (2, 4) or (w_g.dim() == 4 and tuple(w_g.shape[2:]) != (1, 1)) or w_g.shape[0] != fi:
        raise ValueError(f"w_g must be a 1x1 convolution weight ({fi}, C_g[, 1, 1]) (F_int={fi} as w_x); "
                         f"got {tuple(w_g.shape)}")
    if w_g.shape[1] != g.shape[1]:
        raise ValueError(f"g must have {w_g.shape[1]} channels (w_g's in_channels); got {g.shape[1]} "
                         f"(shape {tuple(g.shape)})")
    for name, t, n in (("bias", bias, fi), ("psi_w", psi_w, fi), ("psi_b", psi_b, 1)):
        check_tensor(t, name)
        if t.numel() != n:
            raise ValueError(f"{name} must have {n} elements; got shape {tuple(t.shape)}")
    check_same({"x": x, "g": g})
    check_same({"x": x, "w_x": w_x, "w_g": w_g, "bias": bias, "psi_w": psi_w, "psi_b": psi_b}, dtype=False)
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"x and g must have the same batch size; got {x.shape[0]} and {g.shape[0]}")
    if x.shape[2] < k or x.shape[3] < k or 0 in g.shape[1:] or x.shape[1] == 0:
        raise ValueError(f"x must be at least {k}x{k} with channels and g non-empty; got x {tuple(x.shape)}, "
                         f"g {tuple(g.shape)}")
    if max(x[0].numel(), g[0].numel()) >= 2 ** 31:
        raise ValueError(f"one sample of x or g must have fewer than 2**31 elements (32-bit offsets in the "
                         f"kernels); got x {tuple(x.shape[1:])}, g {tuple(g.shape[1:])}")


def check_gate_inputs(x, m) -> None:
    check_tensor(x, "x", ndim=4)
    check_tensor(m, "map", ndim=4)
    check_same({"x": x, "map": m})
    if m.shape[1] != 1 or m.shape[0] != x.shape[0] or m.shape[2:] != x.shape[2:]:
        raise ValueError(f"map must be (B, 1, H, W) for x {tuple(x.shape)}; got {tuple(m.shape)}")


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
def _grid(x, stride):
    return x.shape[2] // stride, x.shape[3] // stride


def _resize(t, size):
    return t if tuple(t.shape[2:]) == tuple(size) else F.interpolate(t, size=size, mode="bilinear",
                                                                     align_corners=False)


def relu_grad(z, grad):
    """Eager relu's backward: ``grad`` where z > 0 and where z is NaN, 0 where z <= 0."""
    return torch.where(z <= 0, 0.0, grad)


def _chunks(B: int, per_sample: int, device: torch.device) -> list:
    return _cpu_pool.batch_chunks(B, per_sample, device, cpu_elems=CPU_CHUNK_ELEMENTS, elems=TORCH_CHUNK_ELEMENTS)


def _f_limit(fi: int):
    """``kernel_eligible``'s limit: F_int above the kernels' register tile takes the PyTorch path."""
    def limit():
        from ..kernels.attention_gate import MAX_F

        return f"F_int={fi} > {MAX_F} has no Triton kernel" if fi > MAX_F else None
    return limit


def _params(x, w_x, w_g, bias, psi_w, psi_b, ct):
    return (w_x.to(ct), w2d(w_g).to(ct), bias.reshape(-1).to(ct),
            psi_w.reshape(-1).to(ct), psi_b.reshape(()).to(ct))


def _kernel_params(x, w_x, w_g, bias, psi_w):
    """The kernels' weights: W_x (F, C*k*k) and W_g (F, C_g) contiguous in x's dtype; bias, psi fp32."""
    fi = w_x.shape[0]
    return (w_x.reshape(fi, -1).to(x.dtype).contiguous(), w2d(w_g).to(x.dtype).contiguous(),
            bias.reshape(-1).to(torch.float32).contiguous(), psi_w.reshape(-1).to(torch.float32).contiguous())


def _torch_z(xc, gc, wx, wg, bias, k, size):
    """z for a batch chunk in eager's order (project g, add the bias, resize): the same NaN/inf as eager."""
    return F.conv2d(xc, wx, stride=k) + _resize(torch.einsum("bchw,fc->bfhw", gc, wg) + bias.view(1, -1, 1, 1), size)


# ----------------------------------------------------------------------------------------------
# logits: forward op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("attnfast::attention_gate_logits", mutates_args=())
@autocast_off
def attention_gate_logits_op(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                             bias: torch.Tensor, psi_w: torch.Tensor, psi_b: torch.Tensor, stride: int
                             ) -> torch.Tensor:
    B = x.shape[0]
    Ht, Wt = _grid(x, stride)
    ct = compute_dtype(x)
    logits = _alloc.empty((B, 1, Ht, Wt), device=x.device, dtype=ct)
    fi = w_x.shape[0]
    if kernel_eligible("attention_gate", x, g, w_x, w_g, bias, psi_w, psi_b, limit=_f_limit(fi)):
        from ..kernels.attention_gate import attention_gate_fwd

        wx, wg, b32, psi32 = _kernel_params(x, w_x, w_g, bias, psi_w)
        attention_gate_fwd(x, g, wx, wg, b32, psi32, psi_b.reshape(1).to(torch.float32), stride, logits)
        return logits
    wx, wg, b, psi, pb = _params(x, w_x, w_g, bias, psi_w, psi_b, ct)
    chunks = _chunks(B, fi * Ht * Wt, x.device)

    def logits_of(i):
        b0, b1 = chunks[i]
        z = _torch_z(x[b0:b1].to(ct), g[b0:b1].to(ct), wx, wg, b, stride, (Ht, Wt))
        logits[b0:b1] = torch.einsum("bfhw,f->bhw", torch.relu(z), psi).unsqueeze(1) + pb

    _cpu_pool.run_chunks(logits_of, chunks, x.device, per_sample=fi * Ht * Wt, inflight=CPU_INFLIGHT_ELEMENTS)
    return logits


@attention_gate_logits_op.register_fake
def _(x, g, w_x, w_g, bias, psi_w, psi_b, stride):
    Ht, Wt = _grid(x, stride)
    return x.new_empty((x.shape[0], 1, Ht, Wt), dtype=compute_dtype(x))


# ----------------------------------------------------------------------------------------------
# logits: backward op
# ----------------------------------------------------------------------------------------------
def _torch_backward(dl, x, g, w_x, w_g, bias, psi_w, psi_b, k, dx, dg):
    ct = dl.dtype
    B, fi = x.shape[0], w_x.shape[0]
    Ht, Wt = dl.shape[2:]
    wx, wg, b, psi, _ = _params(x, w_x, w_g, bias, psi_w, psi_b, ct)
    chunks = _chunks(B, fi * Ht * Wt, x.device)
    n = len(chunks)  # per-chunk partial weight gradients, added in chunk order afterwards
    dwx_p, dwg_p = wx.new_empty((n, *wx.shape)), wg.new_empty((n, *wg.shape))
    dbias_p, dpsi_p = b.new_empty((n, *b.shape)), psi.new_empty((n, *psi.shape))

    def grads_of(i):
        b0, b1 = chunks[i]
        xc, gc = x[b0:b1].to(ct), g[b0:b1].to(ct)
        z = _torch_z(xc, gc, wx, wg, b, k, (Ht, Wt))
        dlc = dl[b0:b1]
        dpsi_p[i] = torch.einsum("bhw,bfhw->f", dlc[:, 0], torch.relu(z))
        dz = relu_grad(z, dlc * psi.view(1, -1, 1, 1))
        del z
        dx[b0:b1] = torch.nn.grad.conv2d_input(xc.shape, wx, dz, stride=k)
        dwx_p[i] = torch.nn.grad.conv2d_weight(xc, wx.shape, dz, stride=k)
        if tuple(gc.shape[2:]) != (Ht, Wt):  # the resize's adjoint, at g's resolution
            dz = torch.ops.aten.upsample_bilinear2d_backward(dz, [Ht, Wt], [dz.shape[0], dz.shape[1], *gc.shape[2:]],
                                                             False)
        dbias_p[i] = dz.sum((0, 2, 3))
        dwg_p[i] = torch.einsum("bfhw,bchw->fc", dz, gc)
        dg[b0:b1] = torch.einsum("bfhw,fc->bchw", dz, wg)

    _cpu_pool.run_chunks(grads_of, chunks, x.device, per_sample=fi * Ht * Wt, inflight=CPU_INFLIGHT_ELEMENTS)
    dwx, dwg, dbias, dpsi = dwx_p.sum(0), dwg_p.sum(0), dbias_p.sum(0), dpsi_p.sum(0)
    return dwx, dwg, dbias, dpsi


@torch.library.custom_op("attnfast::attention_gate_logits_backward", mutates_args=())
@autocast_off
def attention_gate_logits_backward_op(dlogits: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                                      w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
                                      psi_w: torch.Tensor, psi_b: torch.Tensor, stride: int
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dg, dw_x, dw_g, dbias, dpsi_w, dpsi_b) from dlogits (B, 1, Ht, Wt)."""
    ct = compute_dtype(x)
    dl = dlogits.to(ct)
    B, fi = x.shape[0], w_x.shape[0]
    Ht, Wt = dl.shape[2:]
    dx = _alloc.empty_like(x)
    dg = _alloc.empty_like(g)
    if kernel_eligible("attention_gate", x, dlogits, g, w_x, w_g, bias, psi_w, psi_b, limit=_f_limit(fi)):
        from ..kernels.attention_gate import attention_gate_bwd, attention_gate_bwd_weight

        wx, wg, b32, psi32 = _kernel_params(x, w_x, w_g, bias, psi_w)
        dl = dl.contiguous()
        if x.shape[2] % stride or x.shape[3] % stride:
            dx.zero_()  # pixels outside every patch: no theta gradient
        interp = tuple(g.shape[2:]) != (Ht, Wt)
        dgi = torch.empty((B, g.shape[1], Ht, Wt), device=x.device, dtype=torch.float32) if interp else dg
        attention_gate_bwd(x, g, wx, wg, b32, psi32, dl, stride, dx, dgi)
        if interp:
            dg.copy_(torch.ops.aten.upsample_bilinear2d_backward(dgi, [Ht, Wt], list(g.shape), False))
        dw, dbias, dpsi = attention_gate_bwd_weight(x, g, wx, wg, b32, psi32, dl, stride)
        kx = wx.shape[1]
        dwx, dwg = dw[:, :kx], dw[:, kx:]
    else:
        dwx, dwg, dbias, dpsi = _torch_backward(dl, x, g, w_x, w_g, bias, psi_w, psi_b, stride, dx, dg)
    outs = []
    for grad, p in ((dwx, w_x), (dwg, w_g), (dbias, bias), (dpsi, psi_w), (dl.sum(), psi_b)):
        t = _alloc.empty_like(p)
        t.copy_(grad.reshape(p.shape))
        outs.append(t)
    return (dx, dg, *outs)


@attention_gate_logits_backward_op.register_fake
def _(dlogits, x, g, w_x, w_g, bias, psi_w, psi_b, stride):
    return tuple(torch.empty_like(t) for t in (x, g, w_x, w_g, bias, psi_w, psi_b))


def _logits_setup(ctx, inputs, output):
    *tensors, stride = inputs
    ctx.save_for_backward(*tensors)
    ctx.stride = stride


def _logits_backward(ctx, dlogits):
    grads = attention_gate_logits_backward_op(dlogits, *ctx.saved_tensors, ctx.stride)
    return (*grads, None)


attention_gate_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)


# ----------------------------------------------------------------------------------------------
# the gating product
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("attnfast::attention_gate_mul", mutates_args=())
@autocast_off
def gate_op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    y = _alloc.empty_like(x)
    if kernel_eligible("attention_gate", x, m):
        from ..kernels.attention_gate import gate_fwd

        return gate_fwd(x, m, y)
    ct = compute_dtype(x)
    return y.copy_(x.to(ct) * m.to(ct))


@gate_op.register_fake
def _(x, m):
    return torch.empty_like(x)


@torch.library.custom_op("attnfast::attention_gate_mul_backward", mutates_args=())
@autocast_off
def gate_backward_op(dy: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx = _alloc.empty_like(x)
    dm = _alloc.empty_like(m)
    B, _, H, W = x.shape
    if kernel_eligible("attention_gate", x, dy, m):
        from ..kernels.attention_gate import gate_bwd

        dm32 = torch.empty((B, H * W), device=x.device, dtype=torch.float32)
        gate_bwd(dy, x, m, dx, dm32)
        return dx, dm.copy_(dm32.view(m.shape))
    ct = compute_dtype(x)
    chunks = _chunks(B, x[0].numel(), x.device)

    def grads_of(i):
        b0, b1 = chunks[i]
        dyc = dy[b0:b1].to(ct)
        dx[b0:b1] = dyc * m[b0:b1].to(ct)
        dm[b0:b1] = torch.einsum("bchw,bchw->bhw", dyc, x[b0:b1].to(ct)).unsqueeze(1)

    _cpu_pool.run_chunks(grads_of, chunks, x.device)
    return dx, dm


@gate_backward_op.register_fake
def _(dy, x, m):
    return torch.empty_like(x), torch.empty_like(m)


def _gate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gate_backward(ctx, dy):
    return gate_backward_op(dy, *ctx.saved_tensors)


gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


# ----------------------------------------------------------------------------------------------
# BatchNorm folding (small torch graphs: autograd gives BatchNorm's exact gradients)
# ----------------------------------------------------------------------------------------------
class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean (C,) and biased covariance (C, C) of v (B, C, H, W) over B*H*W, in the compute
    dtype; over batch chunks, saving only v (and the mean) for backward."""

    @staticmethod
    def forward(ctx, v):
        ct = compute_dtype(v)
        B, C = v.shape[:2]
        n = v.numel() // max(C, 1)
        mean = v.sum((0, 2, 3), dtype=ct) / n
        chunks = _chunks(B, v[0].numel(), v.device)
        cov_p = torch.empty((len(chunks), C, C), device=v.device, dtype=ct)  # added in chunk order afterwards

        def cov_of(i):
            b0, b1 = chunks[i]
            vc = (v[b0:b1].to(ct) - mean.view(1, -1, 1, 1)).flatten(2)
            cov_p[i] = torch.einsum("bcn,bdn->cd", vc, vc)

        _cpu_pool.run_chunks(cov_of, chunks, v.device)
        ctx.save_for_backward(v, mean)
        return mean, cov_p.sum(0) / n

    @staticmethod
    def backward(ctx, dmean, dcov):
        v, mean = ctx.saved_tensors
        B, C = v.shape[:2]
        n = v.numel() // max(C, 1)
        ct = mean.dtype
        sym = (dcov + dcov.T) / n
        dv = torch.empty_like(v)
        chunks = _chunks(B, v[0].numel(), v.device)

        def dv_of(i):
            b0, b1 = chunks[i]
            vc = v[b0:b1].to(ct) - mean.view(1, -1, 1, 1)
            dv[b0:b1] = torch.einsum("cd,bdhw->bchw", sym, vc) + (dmean / n).view(1, -1, 1, 1)

        if torch.is_grad_enabled():  # double backward (create_graph=True): record the graph in this thread
            for i in range(len(chunks)):
                dv_of(i)
        else:
            _cpu_pool.run_chunks(dv_of, chunks, v.device)
        return dv


def channel_moments(v: torch.Tensor):
    """(mean (C,), biased covariance (C, C)) of v's channels over batch and pixels; differentiable."""
    with torch.autocast(v.device.type, enabled=False):
        return _ChannelMoments.apply(v)


def projection_stats(w: torch.Tensor, b, moments):
    """Batch mean and biased variance per output channel of the 1x1 projection ``w v + b``
    (w: (F, C[, 1, 1])) from v's ``channel_moments``."""
    mean, cov = moments
    w2 = w.reshape(w.shape[0], -1).to(mean.dtype)
    mu = w2 @ mean + (b.to(mean.dtype) if b is not None else 0.0)
    var = ((w2 @ cov) * w2).sum(1)
    return mu, var


def fold_batch_norm(w: torch.Tensor, b, mean, var, gamma, beta, eps: float):
    """``BN(w v + b)`` as ``w' v + b'``: ``w' = w s``, ``b' = (b - mean) s + beta``, ``s = gamma / sqrt(var + eps)``
    (gamma/beta None: 1/0). Returns (w', b') in mean's dtype; w' keeps w's shape."""
    ct = mean.dtype
    s = torch.rsqrt(var.to(ct) + eps)
    if gamma is not None:
        s = s * gamma.to(ct)
    # eager BatchNorm's ``v * s + (beta - mean * s)`` (so a non-finite gamma or statistic gives eager's NaN/inf)
    shift = (beta.to(ct) if beta is not None else 0.0) - mean.to(ct) * s
    bias = shift if b is None else b.to(ct) * s + shift
    return w.to(ct) * s.view(-1, *([1] * (w.dim() - 1))), bias


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def attention_gate_logits(x, g, w_x, w_g, bias, psi_w, psi_b, stride: int = 1) -> torch.Tensor:
    """``psi_w . relu(conv_k(x; w_x) + w_g up(g) + bias) + psi_b`` (B, 1, H // k, W // k) fp32 (fp64 for fp64),
    fused; validates its inputs (ValueError)."""
    check_attention_gate_inputs(x, g, w_x, w_g, bias, psi_w, psi_b, stride)
    return attention_gate_logits_op(x, g, w_x, w_g, bias, psi_w, psi_b, int(stride))


def gate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x * m`` for a one-channel map m (B, 1, H, W), fused forward and backward."""
    check_gate_inputs(x, m)
    return gate_op(x, m)


def attention_gate(x, g, w_x, w_g, bias, psi_w, psi_b, stride: int = 1, softmax: bool = False):
    """The gate without BatchNorm: ``map = up_x(sigmoid(logits))`` (or a softmax over theta's grid),
    returns ``(x * map, map)`` with map (B, 1, H, W) in x's dtype."""
    logits = attention_gate_logits(x, g, w_x, w_g, bias, psi_w, psi_b, stride)
    if softmax:
        att = torch.softmax(logits.flatten(1), 1).view(logits.shape)
    else:
        att = torch.sigmoid(logits)
    att = _resize(att, x.shape[2:]).to(x.dtype)
    return gate(x, att), att
