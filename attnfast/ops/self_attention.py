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
- PyTorch, CPU (fp32, and fp16/bf16 computed in fp32): tasks of (sample, query rows) that
  ``attnfast._cpu_pool.run_tasks`` hands to single-threaded workers, one task at a time (a worker on a busy
  core does fewer tasks; no op waits for all threads). A task walks its rows in blocks of ``cpu_rows(...)``
  rows x NK scores (``CPU_BLOCK_ELEMS``, in the worker's cache): per block one GEMM at the true query/key
  dim (no padding to the value dim, as SDPA's flash kernel needs), PyTorch's fused softmax, the value GEMM;
  the backward recomputes the block the same way and uses PyTorch's fused softmax backward. dK and dV sum
  over a sample's rows in a fixed order (deterministic whatever the scheduling): whole samples per task when
  there are enough samples, else per-chunk partial sums (``cpu_split``, at most 4 per sample). Results do not
  depend on the scheduling; the splits depend on the thread count and B, so the last bits can differ between
  thread counts. Memory O(workers x block + N * C).
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

from .. import _alloc, _cpu_pool
from .._checks import check_tensor
from .._dispatch import autocast_off, compute_dtype, kernel_eligible

# Score-matrix elements per chunk of the batched PyTorch path (B * rows * NK). 2**22 fp32 = 16 MiB,
# and the backward holds two such blocks.
CHUNK_ELEMS = 1 << 22
# Score elements per block of a CPU task (rows x NK, fp32): the block's S and P (2 MiB each) stay in the worker's
# core cache (L2 and its share of L3) between the block's ops. Chosen by timing 2**17 to 2**20 at B=8, C=128,
# 64x64 on the 2-core development machine (2**18 and 2**19 fastest, quiet and with one busy process);
# benchmarks/cpu_load.py measures the op against its alternatives under load.
CPU_BLOCK_ELEMS = 1 << 19
# At most this many chunks per sample in the CPU backward (each with its own partial dK/dV).
MAX_SPLIT = 4
# Test-only: an int here overrides both budgets (the tests monkeypatch it to force many blocks and tasks).
BLOCK_ELEMS_OVERRIDE = None


def _budget(default: int) -> int:
    return default if BLOCK_ELEMS_OVERRIDE is None else int(BLOCK_ELEMS_OVERRIDE)


def chunk_rows(b: int, nq: int, nk: int, elems: int = CHUNK_ELEMS) -> int:
    """Query rows per chunk of the batched PyTorch path: B * rows * NK <= elems (at least 1 row)."""
    return max(1, min(nq, _budget(elems) // max(1, b * nk)))


def cpu_rows(nq: int, nk: int) -> int:
    """Query rows per block of a CPU task: rows * NK <= ``CPU_BLOCK_ELEMS`` (at least 1 row)."""
    return max(1, min(nq, _budget(CPU_BLOCK_ELEMS) // max(1, nk)))


def cpu_split(b: int, nq: int, rows: int, workers: int, backward: bool) -> int:
    """Query rows per CPU task (a multiple of ``rows``, or all NQ). Forward: about 8 tasks per worker, so a
    worker on a busy core costs at most a small task. Backward: dK and dV sum over a sample's rows, so a task
    takes a whole sample while there are 4 samples per worker, else a sample splits into at most 2 x workers
    and at most ``MAX_SPLIT`` chunks, each with its own fp32 partial dK/dV summed afterwards in a fixed order
    (so the partials hold at most 4x dK and dV in fp32, whatever the thread count)."""
    if nq == 0:
        return 1
    if backward:
        split = 1 if b >= 4 * workers else max(1, min(-(-4 * workers // max(b, 1)), 2 * workers, MAX_SPLIT))
        chunk = -(-nq // split)
    else:
        chunk = -(-b * nq // (8 * workers))
    return min(nq, max(rows, -(-chunk // rows) * rows))


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


def _f32_keys_values(k, v, scale):
    """k (scale folded in) and v in fp32: the inputs themselves when already fp32 and scale is 1."""
    kf = k.to(torch.float32)
    return (kf if scale == 1.0 else kf * scale), v.to(torch.float32)


def _fwd_cpu(q, k, v, x, gamma, scale, out, o, lse):
    # Per block (single-threaded, in a worker): S = Q^T K, P = softmax(S), lse from S's max and P there, the
    # value GEMM into o (or out). The residual epilogue runs once over the whole output.
    f32 = torch.float32
    b, d, nq = q.shape
    nk = k.shape[2]
    rows = cpu_rows(nq, nk)
    chunk = cpu_split(b, nq, rows, _cpu_pool.workers(), backward=False)
    kf, vf = _f32_keys_values(k, v, scale)
    # the attention output lands in o (fp32, saved for the backward) or, without it, in out when out is fp32
    direct = o if o is not None else (out if out.dtype == f32 else None)
    g = gamma.to(f32).reshape(()) if gamma is not None else None

    def task(t):
        bi, r0, r1 = t
        kb, vb = kf[bi], vf[bi]
        s_buf = torch.empty(min(rows, r1 - r0) * nk, dtype=f32)
        p_buf = torch.empty_like(s_buf)
        for i0 in range(r0, r1, rows):
            i1 = min(r1, i0 + rows)
            n = (i1 - i0) * nk
            s = torch.mm(q[bi, :, i0:i1].to(f32).t(), kb, out=s_buf[:n].view(i1 - i0, nk))
            p = _softmax_into(s, p_buf[:n].view(i1 - i0, nk))
            # lse = max s + log(sum exp(s - max s)); p at the max is exp(0) / sum
            mx, at = s.max(-1, keepdim=True)
            torch.sub(mx.squeeze(-1), p.gather(-1, at).squeeze(-1).log_(), out=lse[bi, i0:i1])
            if direct is not None:
                torch.mm(vb, p.t(), out=direct[bi, :, i0:i1])  # (DV, m)
                continue
            oc = torch.mm(vb, p.t())
            if x is None:
                out[bi, :, i0:i1].copy_(oc)
            else:
                torch.addcmul(x[bi, :, i0:i1], oc, g, out=out[bi, :, i0:i1])

    _cpu_pool.run_tasks(task, [(bi, r0, min(nq, r0 + chunk)) for bi in range(b) for r0 in range(0, nq, chunk)])
    if direct is not None:
        if x is not None:  # fp32 arithmetic (x promotes), one rounding into out's dtype
            torch.addcmul(x, direct, g, out=out)
        elif direct is not out:
            out.copy_(direct)
    return out, o, lse


def _bwd_cpu(grad, q, k, v, o, gamma, scale, dq, dk, dv, r):
    # Per block (single-threaded, in a worker): S, P = softmax(S), dV += dO P, dP = dO^T V, dS = PyTorch's fused
    # softmax backward P * (dP - rowsum(dP * P)) (eager's own op, in place over dP), dQ, dK += Q dS.
    f32 = torch.float32
    b, d, nq = q.shape
    nk, dvd = k.shape[2], v.shape[1]
    if nq == 0:
        return dq, dk.zero_(), dv.zero_(), r
    rows = cpu_rows(nq, nk)
    chunk = cpu_split(b, nq, rows, _cpu_pool.workers(), backward=True)
    split = -(-nq // chunk)
    g_post, g_pre = _gamma_factors(gamma, f32, q.device)
    pre_one = bool(g_pre == 1)  # a CPU tensor: no device sync
    gf = grad.to(f32)
    kf, vf = _f32_keys_values(k, v, scale)
    if split > 1:  # per-chunk partial sums, added in chunk order afterwards
        dk_part = torch.empty(b, split, d, nk, dtype=f32)
        dv_part = torch.empty(b, split, dvd, nk, dtype=f32)

    def task(t):
        bi, c = t
        r0, r1 = c * chunk, min(nq, (c + 1) * chunk)
        kb, vb = kf[bi], vf[bi]
        torch.sum(gf[bi, :, r0:r1] * o[bi, :, r0:r1], 0, out=r[bi, r0:r1])  # rowsum(dout * o), for dgamma
        dka = dk_part[bi, c] if split > 1 else torch.empty(d, nk, dtype=f32)
        dva = dv_part[bi, c] if split > 1 else torch.empty(dvd, nk, dtype=f32)
        s_buf = torch.empty(min(rows, r1 - r0) * nk, dtype=f32)  # S, then dP and dS of the same block
        p_buf = torch.empty_like(s_buf)
        for i0 in range(r0, r1, rows):
            i1 = min(r1, i0 + rows)
            n = (i1 - i0) * nk
            qc = q[bi, :, i0:i1].to(f32)  # (D, m)
            dob = gf[bi, :, i0:i1] if pre_one else gf[bi, :, i0:i1] * g_pre  # dO without g_post, (DV, m)
            s = torch.mm(qc.t(), kb, out=s_buf[:n].view(i1 - i0, nk))
            p = _softmax_into(s, p_buf[:n].view(i1 - i0, nk))
            if i0 == r0:
                torch.mm(dob, p, out=dva)
            else:
                dva.addmm_(dob, p)
            dp = torch.mm(dob.t(), vb, out=s)  # over the consumed S
            ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, f32, grad_input=dp)  # dS w/o g_post * scale
            torch.mul(torch.mm(kb, ds.t()), g_post, out=dq[bi, :, i0:i1])
            if i0 == r0:
                torch.mm(qc, ds, out=dka)
            else:
                dka.addmm_(qc, ds)
        if split == 1:
            torch.mul(dka, g_post * scale, out=dk[bi])
            torch.mul(dva, g_post, out=dv[bi])

    _cpu_pool.run_tasks(task, [(bi, c) for bi in range(b) for c in range(split)])
    if split > 1:
        torch.mul(dk_part.sum(1), g_post * scale, out=dk)
        torch.mul(dv_part.sum(1), g_post, out=dv)
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
