"""``attnfast::grid_attention``: fused grid attention as torch.library custom ops.

``grid_attention(l, g, w_l, w_g, phi_w, phi_b, up_factor, normalize_attn) -> (a, pooled)`` computes
exactly ``attnfast.reference.GridAttention`` (softmax over H*W with sum pooling, or sigmoid with
average pooling) without materialising any A x H x W intermediate. ``return_logits=True`` returns
``(c, pooled)`` with the logits ``c = phi . relu(z) + bias`` (B, 1, H, W) in place of ``a``: a real output
of the op, whose gradient enters the op's backward with the others (``dc_p += dc_logit_p``).

Dispatch (``attnfast._dispatch.kernel_eligible``): CUDA tensors run ``attnfast.kernels.grid_attention``;
CPU tensors run a PyTorch path that has the same memory behaviour: nothing of size A x H x W is
kept for backward, which recomputes ``z = W_l l + up(W_g g)`` from ``l`` (over batch chunks).
float64 inputs and ``attn_features`` > 512 always take the PyTorch path.

fp32 precision: the fused kernels compute ``W_l l`` and its gradients (dl, dW_l) with TF32 tensor-core
dots exactly when eager fp32 1x1 convolutions would use TF32 on that device, i.e. when cuDNN convs
may (``torch.backends.cudnn.conv.fp32_precision``, inherited from ``torch.backends.cudnn`` and
``torch.backends``; the legacy ``torch.backends.cudnn.allow_tf32`` on older torch), read at every
call by ``attnfast.kernels.grid_attention.precision_for`` (``kernels._launch.dot_precision(like="conv")``,
the policy of every op); IEEE fp32 otherwise. PyTorch's default
allows TF32 for cuDNN convolutions; set ``torch.backends.cudnn.conv.fp32_precision = "ieee"`` (or
``allow_tf32 = False``) for IEEE fp32 in both. The low-resolution ``W_g g`` projection and its
gradients are fp32 matmuls, which follow PyTorch's matmul setting
(``torch.backends.cuda.matmul.fp32_precision``) like any matmul. Statistics, softmax and
accumulation are fp32 in every case; 16-bit inputs use the tensor cores as they are.

What is saved for backward: the inputs (already alive), the fp32 logits (B x H*W), the per-sample
log-sum-exp (B) and the fp32 pooled output (B x C). The backward is its own custom op
(``attnfast::grid_attention_backward``), so it dispatches the same way. A gradient into the logits
(``return_logits=True`` with ``c`` in the loss) is added to ``dc``: on the PyTorch path before its one pass;
on the Triton path the kernels take the gradients of ``a`` and ``pooled`` and the logits' share of ``dl`` and
``dG_p`` comes from the PyTorch path's chunked pass (``dW_l``, ``dphi`` and the bias from the summed ``dc``).

Backward math (s = 1 for softmax, 1/(H*W) for sigmoid)::

    ghat_p = da_p + s * dpooled . l_p
    dc_p   = a_p (ghat_p - K)    with K = sum_q a_q ghat_q = sum_q a_q da_q + dpooled . pooled  (softmax)
    dc_p   = ghat_p a_p (1 - a_p)                                                              (sigmoid)
    dc_p  += dc_logit_p                                                 (a gradient into the logits, if any)
    dz_p   = [not z_p <= 0] dc_p phi;  dl_p = s a_p dpooled + W_l^T dz_p;  dW_l = sum_p dz_p l_p^T
    dphi   = sum_p dc_p relu(z_p);  dbias = sum_p dc_p;  dGp = up^T(dz);  dW_g, dg from dGp (low-res)

NaN and inf propagate as in the eager module, forward and backward, on both paths: relu keeps NaN and its
gradient passes where z is NaN (eager's ``threshold_backward``), the softmax of a row holding a NaN or a
+inf, or of an all -inf row, is NaN (``softmax_lse``), and a -inf logit gets probability 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import Optional

from .. import _alloc, _cpu_pool
from .._checks import check_same, check_tensor, check_up_factor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible
from ..kernels._launch import w2d

# The PyTorch path processes this many z elements (B_chunk x A x H x W) at a time.
TORCH_CHUNK_ELEMENTS = 1 << 22
# On CPU, a chunk is a task for ``attnfast._cpu_pool``'s single-threaded workers (a worker on a busy core takes fewer;
# no op waits for every thread) of at most this many z elements (one sample at least), with about 4 tasks per worker
# while there are samples for them and a task keeps ``_cpu_pool.MIN_TASK_ELEMS`` (so the main job's small maps are one
# chunk, run in the calling thread; ``_cpu_pool.batch_chunks``); the chunks in flight at once hold at most
# CPU_INFLIGHT_ELEMENTS z elements (or one chunk), as each holds a few z-sized temporaries. Timed by
# benchmarks/cpu_load.py, not tuned there.
CPU_CHUNK_ELEMENTS = 1 << 20
CPU_INFLIGHT_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_grid_attention_inputs(l, g, w_l, w_g, phi_w, phi_b, up_factor) -> None:
    """ValueError for anything the op cannot compute (what was expected is in the message)."""
    check_tensor(l, "l", ndim=4)
    check_tensor(g, "g", ndim=4)
    for name, wt in (("W_l.weight", w_l), ("W_g.weight", w_g), ("phi.weight", phi_w)):
        check_tensor(wt, name)
        if wt.dim() not in (2, 4) or (wt.dim() == 4 and tuple(wt.shape[2:]) != (1, 1)):
            raise ValueError(f"{name} must be a 1x1 convolution weight (out, in, 1, 1) or (out, in); "
                             f"got shape {tuple(wt.shape)}")
    check_tensor(phi_b, "phi.bias")
    C, Cg = l.shape[1], g.shape[1]
    A = w_l.shape[0]
    if w_l.shape[1] != C:
        raise ValueError(f"l must have {w_l.shape[1]} channels (W_l's in_features); got {C}")
    if w_g.shape[1] != Cg:
        raise ValueError(f"g must have {w_g.shape[1]} channels (W_g's in_features); got {Cg}")
    if w_g.shape[0] != A or phi_w.shape[1] != A:
        raise ValueError(f"W_g and phi must agree with W_l's attn_features={A}; got W_g out={w_g.shape[0]}, "
                         f"phi in={phi_w.shape[1]}")
    if phi_w.shape[0] != 1 or phi_b.numel() != 1:
        raise ValueError(f"phi must map to 1 channel with one bias; got weight {tuple(phi_w.shape)}, "
                         f"bias {tuple(phi_b.shape)}")
    if int(up_factor) != up_factor or up_factor < 1:
        raise ValueError(f"up_factor must be a positive integer; got {up_factor!r}")
    check_same({"l": l, "g": g, "W_l.weight": w_l, "W_g.weight": w_g, "phi.weight": phi_w, "phi.bias": phi_b})
    check_up_factor(l.shape, g.shape, int(up_factor))
    if max(l.shape[1] * l.shape[2] * l.shape[3], g.shape[1] * g.shape[2] * g.shape[3]) >= 2 ** 31:
        raise ValueError(f"one sample of l or g must have fewer than 2**31 elements (32-bit offsets in the "
                         f"kernels); got l {tuple(l.shape[1:])}, g {tuple(g.shape[1:])}")
    if l.shape[2] * l.shape[3] == 0 or l.shape[1] == 0:
        raise ValueError(f"l must have at least one channel and one pixel; got shape {tuple(l.shape)}")


# ----------------------------------------------------------------------------------------------
# shared small pieces (low resolution / per-sample, cheap in torch)
# ----------------------------------------------------------------------------------------------
def _project_g(g: torch.Tensor, w_g: torch.Tensor) -> torch.Tensor:
    """Gp = W_g g at g's resolution in the compute dtype (fp32; fp64 for fp64), (B, h, w, A) contiguous."""
    ct = compute_dtype(g)
    return torch.einsum("bchw,ac->bhwa", g.to(ct), w2d(w_g).to(ct)).contiguous()


def _kernel_limit(w_l: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot take this attn_features (None: they can)."""
    from ..kernels.grid_attention import MAX_ATTN_FEATURES

    A = w_l.shape[0]
    return None if A <= MAX_ATTN_FEATURES else f"attn_features={A} > {MAX_ATTN_FEATURES} has no Triton kernel"


def softmax_lse(logits: torch.Tensor) -> torch.Tensor:
    """Per-row log-sum-exp as eager softmax shifts its row: ``max + log(sum(exp(x - max)))``.

    NaN for a row that holds a NaN or a +inf, or is all -inf (where eager softmax gives NaN); a -inf
    among finite logits gets probability 0. (``torch.logsumexp`` gives +inf and -inf for those rows,
    which would put finite probabilities where eager has NaN.)"""
    m = logits.amax(1, keepdim=True)
    return (m + torch.exp(logits - m).sum(1, keepdim=True).log()).squeeze(1)


def relu_grad(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Eager relu's backward (``threshold_backward`` on ``relu(z)``): ``grad`` where z > 0 and where z
    is NaN, 0 where z <= 0."""
    return torch.where(z <= 0, 0.0, grad)


def _attention(logits: torch.Tensor, lse: torch.Tensor, normalize: bool) -> torch.Tensor:
    return torch.exp(logits - lse[:, None]) if normalize else torch.sigmoid(logits)


def _upsample(t: torch.Tensor, up: int) -> torch.Tensor:
    return F.interpolate(t, scale_factor=up, mode="bilinear", align_corners=False) if up > 1 else t


def _chunks(B: int, per_sample: int, device: torch.device) -> list:
    return _cpu_pool.batch_chunks(B, per_sample, device, cpu_elems=CPU_CHUNK_ELEMENTS, elems=TORCH_CHUNK_ELEMENTS)


def _torch_logits(l32, gp, wl32, phi32, bias32, up):
    """z and logits for a chunk (compute dtype): z (b, A, H, W), logits (b, H*W)."""
    z = torch.einsum("bchw,ac->bahw", l32, wl32) + _upsample(gp.permute(0, 3, 1, 2), up)
    c = torch.einsum("bahw,a->bhw", torch.relu(z), phi32) + bias32
    return z, c.flatten(1)


# ----------------------------------------------------------------------------------------------
# forward op
# ----------------------------------------------------------------------------------------------
def _torch_forward(l, gp, w_l, phi_w, phi_b, up, normalize, a, pooled, logits, lse, pooled32):
    B, C, H, W = l.shape
    ct = logits.dtype
    wl32 = w2d(w_l).to(ct)
    phi32 = w2d(phi_w)[0].to(ct)
    bias32 = phi_b.to(ct).reshape(())
    chunks = _chunks(B, wl32.shape[0] * H * W, l.device)

    def logits_of(i):
        b0, b1 = chunks[i]
        logits[b0:b1] = _torch_logits(l[b0:b1].to(ct), gp[b0:b1], wl32, phi32, bias32, up)[1]

    _cpu_pool.run_chunks(logits_of, chunks, l.device, per_sample=wl32.shape[0] * H * W,
                         inflight=CPU_INFLIGHT_ELEMENTS)
    if normalize:
        lse.copy_(softmax_lse(logits))
    else:
        lse.zero_()
    a32 = _attention(logits, lse, normalize)
    a.copy_(a32.view(B, 1, H, W))
    if not normalize:
        a32 = a32 / (H * W)
    chunks = _chunks(B, C * H * W, l.device)

    def pool(i):
        b0, b1 = chunks[i]
        pooled32[b0:b1] = torch.einsum("bchw,bhw->bc", l[b0:b1].to(ct), a32[b0:b1].view(-1, H, W))

    _cpu_pool.run_chunks(pool, chunks, l.device, per_sample=C * H * W, inflight=CPU_INFLIGHT_ELEMENTS)
    pooled.copy_(pooled32)


@torch.library.custom_op("attnfast::grid_attention", mutates_args=())
@autocast_off
def grid_attention_op(l: torch.Tensor, g: torch.Tensor, w_l: torch.Tensor, w_g: torch.Tensor,
                      phi_w: torch.Tensor, phi_b: torch.Tensor, up_factor: int, normalize: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (a, pooled, logits (B, HW), lse (B,), pooled (B, C)); the last three in fp32 (fp64 for fp64).
    ``logits`` is differentiable (its gradient enters the backward op); lse and the fp32 pooled are saved
    for the backward only."""
    B, C, H, W = l.shape
    f32 = dict(device=l.device, dtype=compute_dtype(l))
    a = _alloc.empty((B, 1, H, W), device=l.device, dtype=l.dtype)
    pooled = _alloc.empty((B, C), device=l.device, dtype=l.dtype)
    logits = _alloc.empty((B, H * W), **f32)
    lse = _alloc.empty((B,), **f32)
    pooled32 = _alloc.empty((B, C), **f32)
    gp = _project_g(g, w_g)
    if kernel_eligible("grid_attention", l, g, w_l, w_g, phi_w, phi_b, limit=lambda: _kernel_limit(w_l)):
        from ..kernels.grid_attention import grid_attention_fwd

        grid_attention_fwd(l, gp, w_l, phi_w, phi_b, up_factor, normalize, a, pooled, logits, lse, pooled32)
    else:
        _torch_forward(l, gp, w_l, phi_w, phi_b, up_factor, normalize, a, pooled, logits, lse, pooled32)
    return a, pooled, logits, lse, pooled32


@grid_attention_op.register_fake
def _(l, g, w_l, w_g, phi_w, phi_b, up_factor, normalize):
    B, C, H, W = l.shape
    ct = compute_dtype(l)
    return (l.new_empty((B, 1, H, W)), l.new_empty((B, C)),
            l.new_empty((B, H * W), dtype=ct), l.new_empty((B,), dtype=ct), l.new_empty((B, C), dtype=ct))


# ----------------------------------------------------------------------------------------------
# backward op
# ----------------------------------------------------------------------------------------------
def _torch_backward(l, gp, w_l, phi_w, dc, up, normalize, a32, dpooled, dl):
    """dl (written), and (dW_l, dphi, dGp (B, h, w, A)) in the compute dtype, recomputing z over batch chunks."""
    B, C, H, W = l.shape
    ct = gp.dtype
    wl32 = w2d(w_l).to(ct)
    phi32 = w2d(phi_w)[0].to(ct)
    A = wl32.shape[0]
    scale = 1.0 if normalize else 1.0 / (H * W)
    chunks = _chunks(B, A * H * W, l.device)
    # per-chunk partial sums of dW_l and dphi, added in chunk order afterwards (whichever worker ran a chunk)
    dwl_part = torch.empty((len(chunks), A, C), device=l.device, dtype=ct)
    dphi_part = torch.empty((len(chunks), A), device=l.device, dtype=ct)
    dgp = torch.empty((B, A) + tuple(gp.shape[1:3]), device=l.device, dtype=ct)
    dp32 = dpooled.to(ct)

    def grads_of(i):
        b0, b1 = chunks[i]
        l32 = l[b0:b1].to(ct)
        z, _ = _torch_logits(l32, gp[b0:b1], wl32, phi32, 0.0, up)
        dcc = dc[b0:b1].view(-1, 1, H, W)
        dphi_part[i] = torch.einsum("bhw,bahw->a", dcc[:, 0], torch.relu(z))
        dz = relu_grad(z, dcc * phi32.view(1, -1, 1, 1))
        del z
        dwl_part[i] = torch.einsum("bahw,bchw->ac", dz, l32)
        dl32 = torch.einsum("bahw,ac->bchw", dz, wl32)
        dl32 += scale * a32[b0:b1].view(-1, 1, H, W) * dp32[b0:b1].view(-1, C, 1, 1)
        dl[b0:b1] = dl32
        if up > 1:
            dgp[b0:b1] = torch.ops.aten.upsample_bilinear2d_backward(
                dz, [H, W], list(dz.shape[:2]) + list(gp.shape[1:3]), False, float(up), float(up))
        else:
            dgp[b0:b1] = dz

    _cpu_pool.run_chunks(grads_of, chunks, l.device, per_sample=A * H * W, inflight=CPU_INFLIGHT_ELEMENTS)
    dwl, dphi = dwl_part.sum(0), dphi_part.sum(0)
    return dwl, dphi, dgp.permute(0, 2, 3, 1)


@torch.library.custom_op("attnfast::grid_attention_backward", mutates_args=())
@autocast_off
def grid_attention_backward_op(da: torch.Tensor, dpooled: torch.Tensor, dlogits: Optional[torch.Tensor],
                               l: torch.Tensor, g: torch.Tensor,
                               w_l: torch.Tensor, w_g: torch.Tensor, phi_w: torch.Tensor, phi_b: torch.Tensor,
                               logits: torch.Tensor, lse: torch.Tensor, pooled32: torch.Tensor,
                               up_factor: int, normalize: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """Gradients (dl, dg, dW_l, dW_g, dphi.weight, dphi.bias) from upstream (da, dpooled) and, unless None,
    the gradient of the logits (B, H*W)."""
    B, C, H, W = l.shape
    gp = _project_g(g, w_g)
    ct = gp.dtype
    a32 = _attention(logits, lse, normalize)
    da32 = da.to(ct).reshape(B, H * W)
    dp32 = dpooled.to(ct)
    if normalize:  # K = sum_q a_q ghat_q, per sample
        kvec = (a32 * da32).sum(1) + (dp32 * pooled32).sum(1)
    else:
        kvec = torch.zeros((B,), device=l.device, dtype=ct)
    dl = _alloc.empty_like(l)
    dlog32 = None if dlogits is None else dlogits.to(ct).reshape(B, H * W)
    tensors = (da, dpooled, l, g, w_l, w_g, phi_w, phi_b) + (() if dlogits is None else (dlogits,))
    if kernel_eligible("grid_attention", *tensors, limit=lambda: _kernel_limit(w_l)):
        from ..kernels.grid_attention import grid_attention_bwd, grid_attention_bwd_weight

        dgp = torch.zeros_like(gp)
        dc = _alloc.empty((B, H * W), device=l.device, dtype=torch.float32)
        grid_attention_bwd(l, gp, w_l, phi_w, logits, lse, kvec, da, dpooled, up_factor, normalize,
                           dl, dgp, dc)
        if dlog32 is not None:  # the logits' share of dl and dGp: the PyTorch path's pass over dc = dlogits
            dl_c = torch.empty_like(l)
            zero = dlog32.new_zeros(())
            _, _, dgp_c = _torch_backward(l, gp, w_l, phi_w, dlog32, up_factor, normalize, zero.expand(B, H * W),
                                          zero.expand(B, C), dl_c)
            dl.add_(dl_c)
            dgp += dgp_c
            dc += dlog32
        dwl, dphi = grid_attention_bwd_weight(l, gp, w_l, phi_w, dc, up_factor)
    else:
        scale = 1.0 if normalize else 1.0 / (H * W)
        ghat = da32 + scale * torch.einsum("bc,bchw->bhw", dp32, l.to(ct)).flatten(1)
        dc = a32 * (ghat - kvec[:, None]) if normalize else ghat * a32 * (1 - a32)
        if dlog32 is not None:
            dc = dc + dlog32
        dwl, dphi, dgp = _torch_backward(l, gp, w_l, phi_w, dc, up_factor, normalize, a32, dpooled, dl)
    g32 = g.to(ct)
    dg = _alloc.empty_like(g)
    dg.copy_(torch.einsum("bhwa,ac->bchw", dgp, w2d(w_g).to(ct)))
    dw_l = _alloc.empty_like(w_l)
    dw_l.copy_(dwl.view(w_l.shape))
    dw_g = _alloc.empty_like(w_g)
    dw_g.copy_(torch.einsum("bhwa,bchw->ac", dgp, g32).view(w_g.shape))
    dphi_w = _alloc.empty_like(phi_w)
    dphi_w.copy_(dphi.view(phi_w.shape))
    dphi_b = _alloc.empty_like(phi_b)
    dphi_b.copy_(dc.sum().view(phi_b.shape))
    return dl, dg, dw_l, dw_g, dphi_w, dphi_b


@grid_attention_backward_op.register_fake
def _(da, dpooled, dlogits, l, g, w_l, w_g, phi_w, phi_b, logits, lse, pooled32, up_factor, normalize):
    return (torch.empty_like(l), torch.empty_like(g), torch.empty_like(w_l), torch.empty_like(w_g),
            torch.empty_like(phi_w), torch.empty_like(phi_b))


def _setup_context(ctx, inputs, output):
    l, g, w_l, w_g, phi_w, phi_b, up_factor, normalize = inputs
    _, _, logits, lse, pooled32 = output
    ctx.save_for_backward(l, g, w_l, w_g, phi_w, phi_b, logits, lse, pooled32)
    ctx.up_factor = up_factor
    ctx.normalize = normalize
    ctx.mark_non_differentiable(lse, pooled32)
    # An output the loss does not use gets None, not materialized zeros: the logits' share of the backward
    # (a PyTorch pass on the Triton path) runs only when the logits carry a gradient.
    ctx.set_materialize_grads(False)


def _backward(ctx, da, dpooled, dlogits, _dlse, _dpooled32):
    l, g, w_l, w_g, phi_w, phi_b, logits, lse, pooled32 = ctx.saved_tensors
    B, C, H, W = l.shape
    if da is None:  # absent upstream gradient: a stride-0 zero, no memory
        da = l.new_zeros(()).expand(B, 1, H, W)
    if dpooled is None:
        dpooled = l.new_zeros(()).expand(B, C)
    grads = grid_attention_backward_op(da, dpooled, dlogits, l, g, w_l, w_g, phi_w, phi_b, logits, lse, pooled32,
                                       ctx.up_factor, ctx.normalize)
    return (*grads, None, None)


grid_attention_op.register_autograd(_backward, setup_context=_setup_context)


def grid_attention(l: torch.Tensor, g: torch.Tensor, w_l: torch.Tensor, w_g: torch.Tensor,
                   phi_w: torch.Tensor, phi_b: torch.Tensor, up_factor: int, normalize_attn: bool = True,
                   *, return_logits: bool = False):
    """Fused grid attention; returns ``(a, pooled)`` like ``attnfast.reference.GridAttention``, or with
    ``return_logits=True`` ``(c, pooled)``: the logits (B, 1, H, W) in ``l``'s dtype, differentiable.

    ``w_l``, ``w_g``, ``phi_w``: 1x1 conv weights (A, C_l[,1,1]), (A, C_g[,1,1]), (1, A[,1,1]);
    ``phi_b``: (1,). Validates its inputs (ValueError). fp32 on CUDA uses TF32 dots exactly when eager
    fp32 1x1 convolutions would (cuDNN's setting; see the module docstring)."""
    check_grid_attention_inputs(l, g, w_l, w_g, phi_w, phi_b, up_factor)
    a, pooled, logits, _, _ = grid_attention_op(l, g, w_l, w_g, phi_w, phi_b, int(up_factor), bool(normalize_attn))
    if return_logits:
        # a copy: the op saves its logits for backward, and eager's c (the phi conv's output) is saved by nothing,
        # so a caller may scale c in place
        return logits.to(l.dtype, copy=True).view(a.shape), pooled
    return a, pooled
