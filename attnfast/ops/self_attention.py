"""``attnfast::self_attention``: exact SAGAN self-attention without the N x N matrix.

``out = gamma * (v softmax(scale * q^T k)^T) + x`` on the 1x1-conv outputs in their NCHW layout:

- ``q``: (B, D, NQ), ``k``: (B, D, NK), ``v``: (B, DV, NK), ``x``: (B, DV, NQ) (N = H*W; NK may
  differ from NQ, e.g. 2x2 max-pooled keys and values). ``x``/``gamma`` may both be None: then
  the op returns the attention output ``o`` itself (for a value conv followed by an output conv).
- ``scale`` multiplies the logits (SAGAN: 1, no 1/sqrt(d)).

Paths (``attnfast._dispatch.kernel_eligible``):

- Triton (CUDA, or ``ATTNFAST_BACKEND=triton`` with the interpreter): flash-style kernels in
  ``attnfast.kernels.self_attention``; float64 inputs and query/key dims above
  ``kernels.self_attention.MAX_D`` (128) use the PyTorch path instead. fp32 dots are IEEE whatever
  PyTorch's matmul TF32 setting (``kernels._launch.dot_precision(like="ieee")``: the kernels' fp32 tiles are
  FMA tiles), never less accurate than eager's ``bmm``.
- PyTorch, CPU (fp32, and fp16/bf16 computed in fp32): blocks of ``cpu_blocks(...)`` (samples,
  query rows) of ``CPU_BLOCK_ELEMS`` scores; per block one GEMM at the true query/key dim (no padding
  to the value dim, as SDPA's flash kernel needs), PyTorch's fused softmax, the value GEMM; the
  backward recomputes the block the same way and uses PyTorch's fused softmax backward. Few, large
  ops (5 per block forward, 7 backward): each is a parallel region waiting for all threads, which
  is what costs on busy cores. Memory O(block + N * C) forward and backward.
- PyTorch, batched (float64 on any device, and CUDA tensors the Triton kernels do not take): queries
  in chunks of ``chunk_rows(...)`` rows with an exact softmax; memory O(chunk * NK + N * C).

All paths save only q, k, v, the attention output ``o`` (in fp32: it enters ``rowsum(dO * o)``, a
cancelling sum) and ``lse = logsumexp`` per query (fp32) for the backward, which recomputes the
probabilities: from ``lse`` (Triton, batched), or with the same fused softmax as the forward (CPU
path; its lse output is still exact). The backward is its own custom op
(``attnfast::self_attention_backward``), dispatched the same way.

NaN and inf propagate as through the seed's eager layer, forward and backward, on every path: softmax
rows as eager's (NaN for a row holding NaN or +inf or all -inf; a -inf score gets probability 0), and a
gamma of 0, inf or NaN enters the backward as eager's ``dO = gamma * dout`` (``_gamma_factors``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _alloc
from .._checks import check_tensor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible

# Score-matrix elements per chunk of the batched PyTorch path (B * rows * NK). 2**22 fp32 = 16 MiB,
# and the backward holds two such blocks.
CHUNK_ELEMS = 1 << 22
# Score elements per block of the CPU path (samples * rows * NK). 2**23 fp32 = 32 MiB, two such
# buffers (S, P). Each multi-threaded op is one parallel region that waits for all its threads; on busy
# cores every region costs a scheduling delay, so the time follows the number of ops (blocks x 7
# forward, x 8 backward), not their size. Measured at B=8, C=128, 64x64 on 2 shared cores, load 11-14
# (fwd+bwd, CPU seconds / wall): 2 MiB blocks (2**19, before) 28 / 172 s, 2**21 8.8 / 52 s, 2**22
# 5.5 / 34 s, 2**23 3.9 / 17 s, SDPA flash with padded q/k 3.1 / 18 s. 2**24 would double the buffers
# past SDPA flash's peak memory. benchmarks/cpu_load.py measures it.
CPU_BLOCK_ELEMS = 1 << 23
# Test-only: an int here overrides both budgets (the tests monkeypatch it to force many blocks).
BLOCK_ELEMS_OVERRIDE = None


def _budget(default: int) -> int:
    return default if BLOCK_ELEMS_OVERRIDE is None else int(BLOCK_ELEMS_OVERRIDE)


def chunk_rows(b: int, nq: int, nk: int, elems: int = CHUNK_ELEMS) -> int:
    """Query rows per chunk of the batched PyTorch path: B * rows * NK <= elems (at least 1 row)."""
    return max(1, min(nq, _budget(elems) // max(1, b * nk)))


def cpu_blocks(b: int, nq: int, nk: int, d: int, dv: int) -> tuple[int, int]:
    """``(samples, rows)`` per block of the CPU path: whole samples while a sample's scores and its
    fp32 key/value copies fit the budget, else one sample and ``rows * NK`` within it. The budget is
    ``CPU_BLOCK_ELEMS``, but no more than the larger of the output's elements and an eighth of all B*NQ*NK
    scores (at least 2**19): small problems keep small buffers (memory O(block + N * C))."""
    budget = _budget(min(CPU_BLOCK_ELEMS, max(1 << 19, b * nq * dv, b * nq * nk // 8)))
    per_sample = max(nq * nk, (d + dv) * nk, 1)
    if per_sample <= budget:
        return max(1, min(b, budget // per_sample)), max(nq, 1)
    return 1, max(1, min(nq, budget // max(1, nk)))


def _cpu_path(q: torch.Tensor) -> bool:
    """The blocked CPU path takes CPU tensors below float64 (float64 keeps the batched path)."""
    return q.device.type == "cpu" and q.dtype != torch.float64


def _kernel_limit(q: torch.Tensor):
    """Why the Triton kernels cannot take ``q``'s query/key dim (None: they can)."""
    from ..kernels import self_attention as K

    return None if K.supported(q.shape[1]) else f"query/key dim {q.shape[1]} per head > {K.MAX_D} has no Triton kernel"


def check_self_attention_inputs(q, k, v, x, gamma) -> None:
    """ValueError for anything the op cannot compute (what was expected is in the message)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=3)
    if (x is None) != (gamma is None):
        raise ValueError("x and gamma must be given together (residual out = gamma * o + x) or both be None")
    named = {"q": q, "k": k, "v": v}
    if x is not None:
        check_tensor(x, "x", ndim=3)
        check_tensor(gamma, "gamma")
        named["x"] = x
        if gamma.numel() != 1:
            raise ValueError(f"gamma must have exactly one element; got shape {tuple(gamma.shape)}")
        if gamma.device != q.device:
            raise ValueError(f"gamma is on {gamma.device} but q is on {q.device}")
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v and x must share a dtype")
    b, d, nq = q.shape
    if k.shape[0] != b or k.shape[1] != d:
        raise ValueError(f"k must be (B={b}, D={d}, NK) like q's (B, D, NQ); got k {tuple(k.shape)}")
    if v.shape[0] != b or v.shape[2] != k.shape[2]:
        raise ValueError(f"v must be (B={b}, DV, NK={k.shape[2]}) to match k; got v {tuple(v.shape)}")
    if x is not None and tuple(x.shape) != (b, v.shape[1], nq):
        raise ValueError(f"x must be (B, DV, NQ) = {(b, v.shape[1], nq)}; got {tuple(x.shape)}")
    if k.shape[2] == 0 and nq > 0:
        raise ValueError("k and v must have at least one key position (NK >= 1); got NK = 0")
    big = max(t.shape[1] * t.shape[2] for t in named.values())
    if big >= 2 ** 31:
        raise ValueError(f"one sample of q, k, v or x must have fewer than 2**31 elements (32-bit offsets in "
                         f"the kernels); got {big}")


# ----------------------------------------------------------------------------- PyTorch paths

def _gamma_factors(gamma, dtype, device):
    """(g_post, g_pre) 0-dim tensors for the backward, chosen on the device (no host sync), as the Triton
    launcher's ``_gamma_pair``. A finite nonzero gamma scales the results (g_post = gamma, g_pre = 1):
    ``dV = gamma * (dout P)`` etc., ``gamma * dout`` is never formed. A gamma of 0, inf or NaN multiplies
    dout before the sums instead (g_pre = gamma, g_post = 1), as eager forms ``dO = gamma * dout``: each
    product then gets eager's NaN / inf (with gamma = inf a sum of +inf and -inf terms is NaN, where
    ``inf * (finite sum)`` is not). Ones without a residual."""
    one = torch.ones((), dtype=dtype, device=device)
    if gamma is None:
        return one, one
    g = gamma.reshape(()).to(dtype)
    post = torch.isfinite(g) & (g != 0)
    return torch.where(post, g, one), torch.where(post, one, g)

def _fwd_torch(q, k, v, x, gamma, scale, out, o, lse):
    ct = compute_dtype(q)
    b, _, nq = q.shape
    nk = k.shape[2]
    kf, vf = k.to(ct), v.to(ct)
    g = gamma.to(ct).reshape(()) if gamma is not None else None
    rows = chunk_rows(b, nq, nk)
    for i0 in range(0, nq, rows):
        i1 = min(nq, i0 + rows)
        s = torch.bmm(q[:, :, i0:i1].to(ct).transpose(1, 2), kf)  # (B, m, NK)
        if scale != 1.0:
            s.mul_(scale)
        mx = s.amax(-1, keepdim=True)
        p = s.sub_(mx).exp_()
        l = p.sum(-1)  # (B, m)
        oc = torch.bmm(vf, p.transpose(1, 2)).div_(l.unsqueeze(1))  # (B, DV, m)
        lse[:, i0:i1].copy_(mx.squeeze(-1) + l.log())
        if o is not None:
            o[:, :, i0:i1].copy_(oc)
        if x is None:
            out[:, :, i0:i1].copy_(oc)
        else:
            out[:, :, i0:i1].copy_(torch.addcmul(x[:, :, i0:i1].to(ct), oc, g))
    return out, o, lse


def _bwd_torch(grad, q, k, v, o, lse, gamma, scale, dq, dk, dv, r):
    ct = compute_dtype(q)
    b, d, nq = q.shape
    nk = k.shape[2]
    kf, vf = k.to(ct), v.to(ct)
    dk_acc = torch.zeros(b, d, nk, dtype=ct, device=q.device)
    dv_acc = torch.zeros(b, v.shape[1], nk, dtype=ct, device=q.device)
    g_post, g_pre = _gamma_factors(gamma, ct, q.device)
    rows = chunk_rows(b, nq, nk)
    for i0 in range(0, nq, rows):
        i1 = min(nq, i0 + rows)
        qc = q[:, :, i0:i1].to(ct)  # (B, D, m)
        gc = grad[:, :, i0:i1].to(ct)  # (B, DV, m)
        oc = o[:, :, i0:i1].to(ct)
        r[:, i0:i1].copy_((gc * oc).sum(1))  # (B, m), for dgamma
        d_o = gc * g_pre  # dO without g_post
        delta = (d_o * oc).sum(1, keepdim=True).transpose(1, 2)  # (B, m, 1)
        s = torch.bmm(qc.transpose(1, 2), kf)  # (B, m, NK)
        if scale != 1.0:
            s.mul_(scale)
        p = s.sub_(lse[:, i0:i1].to(ct).unsqueeze(-1)).exp_()
        dv_acc.baddbmm_(d_o, p)
        ds = torch.bmm(d_o.transpose(1, 2), vf).sub_(delta).mul_(p)  # (B, m, NK), no g_post*scale
        dq[:, :, i0:i1].copy_(torch.bmm(kf, ds.transpose(1, 2)).mul_(g_post * scale))
        dk_acc.baddbmm_(qc, ds)
    dk.copy_(dk_acc.mul_(g_post * scale))
    dv.copy_(dv_acc.mul_(g_post))
    return dq, dk, dv, r


def _softmax_into(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``p = softmax(s, -1)``: PyTorch's fused kernel (max, exp-sum and scale per row, in L1)."""
    return torch.ops.aten._softmax.out(s, -1, False, out=p)


def _fwd_cpu(q, k, v, x, gamma, scale, out, o, lse):
    # Five multi-threaded ops per block (two GEMMs, the softmax, the max and its gather): each is a
    # parallel region that waits for every thread, so on busy cores the op count, not the FLOPs, sets the
    # time. The residual epilogue runs once over the whole output.
    f32 = torch.float32
    b, d, nq = q.shape
    nk, dvd = k.shape[2], v.shape[1]
    gb, rows = cpu_blocks(b, nq, nk, d, dvd)
    s_buf = torch.empty(gb * rows * nk, dtype=f32)
    p_buf = torch.empty_like(s_buf)
    # the attention output lands in o (fp32, saved for the backward) or, without it, in out when out is fp32
    direct = o if o is not None else (out if out.dtype == f32 else None)
    g = gamma.to(f32).reshape(()) if gamma is not None else None
    for b0 in range(0, b, gb):
        b1 = min(b, b0 + gb)
        kb = k[b0:b1].to(f32)
        if scale != 1.0:
            kb = kb * scale  # (n, D, NK): the logit scale folded into the keys
        vb = v[b0:b1].to(f32)
        for i0 in range(0, nq, rows):
            i1 = min(nq, i0 + rows)
            shape = (b1 - b0, i1 - i0, nk)
            n = shape[0] * shape[1] * nk
            s = torch.bmm(q[b0:b1, :, i0:i1].to(f32).transpose(1, 2), kb, out=s_buf[:n].view(shape))
            p = _softmax_into(s, p_buf[:n].view(shape))
            # lse = max s + log(sum exp(s - max s)); p at the max is exp(0) / sum
            mx, at = s.max(-1, keepdim=True)
            torch.sub(mx.squeeze(-1), p.gather(-1, at).squeeze(-1).log_(), out=lse[b0:b1, i0:i1])
            if direct is not None:
                torch.bmm(vb, p.transpose(1, 2), out=direct[b0:b1, :, i0:i1])  # (n, DV, m)
                continue
            oc = torch.bmm(vb, p.transpose(1, 2))
            dst = out[b0:b1, :, i0:i1]
            if x is None:
                dst.copy_(oc)
            else:
                torch.addcmul(x[b0:b1, :, i0:i1], oc, g, out=dst)
    if direct is not None:
        if x is not None:  # fp32 arithmetic (x promotes), one rounding into out's dtype
            torch.addcmul(x, direct, g, out=out)
        elif direct is not out:
            out.copy_(direct)
    return out, o, lse


def _bwd_cpu(grad, q, k, v, o, gamma, scale, dq, dk, dv, r):
    # Seven multi-threaded ops per block: S, P = softmax(S), dV += dO P, dP = dO^T V, dS = PyTorch's fused
    # softmax backward P * (dP - rowsum(dP * P)) (eager's own op, in place over dP), dQ, dK += Q dS.
    f32 = torch.float32
    b, d, nq = q.shape
    nk, dvd = k.shape[2], v.shape[1]
    if nq == 0:
        return dq, dk.zero_(), dv.zero_(), r
    gb, rows = cpu_blocks(b, nq, nk, d, dvd)
    g_post, g_pre = _gamma_factors(gamma, f32, q.device)
    pre_one = bool(g_pre == 1)  # a CPU tensor: no device sync
    gf = grad.to(f32)
    s_buf = torch.empty(gb * rows * nk, dtype=f32)  # S, then dP and dS of the same block
    p_buf = torch.empty_like(s_buf)
    dk_acc = torch.empty(gb, d, nk, dtype=f32)
    dv_acc = torch.empty(gb, dvd, nk, dtype=f32)
    for b0 in range(0, b, gb):
        b1 = min(b, b0 + gb)
        torch.sum(gf[b0:b1] * o[b0:b1], 1, out=r[b0:b1])  # rowsum(dout * o), for dgamma
        d_o = gf[b0:b1] if pre_one else gf[b0:b1] * g_pre  # dO without g_post
        kb = k[b0:b1].to(f32)
        if scale != 1.0:
            kb = kb * scale
        vb = v[b0:b1].to(f32)
        dka, dva = dk_acc[: b1 - b0], dv_acc[: b1 - b0]
        for i0 in range(0, nq, rows):
            i1 = min(nq, i0 + rows)
            shape = (b1 - b0, i1 - i0, nk)
            n = shape[0] * shape[1] * nk
            qc = q[b0:b1, :, i0:i1].to(f32)  # (n, D, m)
            dob = d_o[:, :, i0:i1]  # (n, DV, m)
            s = torch.bmm(qc.transpose(1, 2), kb, out=s_buf[:n].view(shape))
            p = _softmax_into(s, p_buf[:n].view(shape))
            if i0 == 0:
                torch.bmm(dob, p, out=dva)
            else:
                dva.baddbmm_(dob, p)
            dp = torch.bmm(dob.transpose(1, 2), vb, out=s)  # over the consumed S
            ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, f32, grad_input=dp)  # dS w/o g_post * scale
            torch.mul(torch.bmm(kb, ds.transpose(1, 2)), g_post, out=dq[b0:b1, :, i0:i1])
            if i0 == 0:
                torch.bmm(qc, ds, out=dka)
            else:
                dka.baddbmm_(qc, ds)
        torch.mul(dka, g_post * scale, out=dk[b0:b1])
        torch.mul(dva, g_post, out=dv[b0:b1])
    return dq, dk, dv, r


# ----------------------------------------------------------------------------- custom ops

def _out_buffers(q, v, x, need_o):
    b, _, nq = q.shape
    if x is not None:
        out = _alloc.empty_like(x)
    else:
        out = _alloc.empty((b, v.shape[1], nq), dtype=q.dtype, device=q.device)
    shape = (b, v.shape[1], nq) if need_o else (0,)
    o = _alloc.empty(shape, dtype=compute_dtype(q), device=q.device)
    lse = _alloc.empty((b, nq), dtype=compute_dtype(q), device=q.device)
    return out, o, lse


@torch.library.custom_op("attnfast::self_attention", mutates_args=())
@autocast_off
def self_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: Optional[torch.Tensor],
                      gamma: Optional[torch.Tensor], scale: float, need_o: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, o, lse)``: ``o`` is the attention output in fp32 (fp64 for fp64 inputs),
    saved for the backward; it is empty unless ``need_o``."""
    out, o, lse = _out_buffers(q, v, x, need_o)
    o_arg = o if need_o else None
    if kernel_eligible("self_attention", q, k, v, limit=lambda: _kernel_limit(q)):
        from ..kernels.self_attention import attention_fwd

        attention_fwd(q, k, v, x, gamma, scale, out, o_arg, lse)
    elif _cpu_path(q):
        _fwd_cpu(q, k, v, x, gamma, scale, out, o_arg, lse)
    else:
        _fwd_torch(q, k, v, x, gamma, scale, out, o_arg, lse)
    return out, o, lse


@self_attention_op.register_fake
def _(q, k, v, x, gamma, scale, need_o):
    b, _, nq = q.shape
    out = torch.empty_like(x) if x is not None else q.new_empty((b, v.shape[1], nq))
    o = q.new_empty((b, v.shape[1], nq) if need_o else (0,), dtype=compute_dtype(q))
    return out, o, q.new_empty((b, nq), dtype=compute_dtype(q))


@torch.library.custom_op("attnfast::self_attention_backward", mutates_args=())
@autocast_off
def self_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               o: torch.Tensor, lse: torch.Tensor, gamma: Optional[torch.Tensor],
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dgamma)`` given d(loss)/d(out); ``o`` is the forward's fp32 attention output.
    ``dgamma`` is empty when ``gamma`` is None."""
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    r = _alloc.empty(lse.shape, dtype=lse.dtype, device=q.device)
    if kernel_eligible("self_attention", q, k, v, limit=lambda: _kernel_limit(q)):
        from ..kernels.self_attention import attention_bwd

        attention_bwd(grad, q, k, v, o, lse, gamma, scale, dq, dk, dv, r)
    elif _cpu_path(q):
        _bwd_cpu(grad, q, k, v, o, gamma, scale, dq, dk, dv, r)
    else:
        _bwd_torch(grad, q, k, v, o, lse, gamma, scale, dq, dk, dv, r)
    if gamma is None:
        dgamma = q.new_empty((0,))
    else:
        dgamma = r.sum(dtype=torch.float64).to(gamma.dtype).reshape(gamma.shape)
    return dq, dk, dv, dgamma


@self_attention_backward_op.register_fake
def _(grad, q, k, v, o, lse, gamma, scale):
    dgamma = torch.empty_like(gamma) if gamma is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgamma


def _setup_context(ctx, inputs, output):
    q, k, v, x, gamma, scale, need_o = inputs
    out, o, lse = output
    ctx.residual = x is not None
    ctx.need_o = need_o
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, o, lse, gamma)
    ctx.mark_non_differentiable(o, lse)


def _backward(ctx, grad_out, grad_o, grad_lse):
    if not ctx.need_o:
        raise RuntimeError("attnfast::self_attention was called with need_o=False, so its backward cannot run; "
                           "call it with need_o=True (attnfast.ops.self_attention does when grad is enabled)")
    q, k, v, o, lse, gamma = ctx.saved_tensors
    dq, dk, dv, dgamma = self_attention_backward_op(grad_out, q, k, v, o, lse, gamma, ctx.scale)
    if not ctx.residual:
        return dq, dk, dv, None, None, None, None
    return dq, dk, dv, grad_out, dgamma, None, None


self_attention_op.register_autograd(_backward, setup_context=_setup_context)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: Optional[torch.Tensor] = None,
                   gamma: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """``gamma * (v softmax(scale q^T k)^T) + x`` (or the attention output alone when x and gamma are
    None), shape (B, DV, NQ); validates its inputs. See the module docstring for shapes."""
    check_self_attention_inputs(q, k, v, x, gamma)
    tensors = [t for t in (q, k, v, x, gamma) if t is not None]
    need_o = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out, _, _ = self_attention_op(q, k, v, x, gamma, float(scale), need_o)
    return out
