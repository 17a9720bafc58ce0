"""The blocked CPU path of attnfast::self_attention (fp32, and fp16/bf16 computed in fp32).

What it takes (dispatch), how it splits the work (``cpu_rows``, ``cpu_split``), and that it matches float64
(three-way rule) on every layout, with one worker and with several (``attnfast._cpu_pool``): several row blocks
per task with a ragged last one, samples split into chunks with partial dK/dV sums, one block. The cases cover pooled keys (NK != NQ), a non-unit scale,
d_qk > d_v and d_v > 128, no residual, large logits, empty queries, and the lse it returns.
"""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnfast import _cpu_pool
from attnfast.ops.self_attention import CPU_BLOCK_ELEMS, cpu_rows, cpu_split, self_attention, self_attention_op
from attnfast.testing import assert_close_3way

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_self_attention import _math64, _math_eager  # noqa: E402  (the op-level float64 / eager math)
from test_self_attention import _op_grads as _grads  # noqa: E402

SA = sys.modules["attnfast.ops.self_attention"]  # the package re-exports the function under that name


@pytest.fixture(autouse=True)
def _torch_backend(torch_backend):
    """These are CPU-path tests: CPU tensors, the PyTorch path (as ATTNFAST_BACKEND=auto on CPU)."""


def _inputs(b, d, dv, nq, nk, residual, mult=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(b, d, nq) * mult, rnd(b, d, nk) * mult, rnd(b, dv, nk)
    x = rnd(b, dv, nq) if residual else None
    gamma = torch.tensor([0.7], dtype=torch.float64) if residual else None
    return (q, k, v, x, gamma), rnd(b, dv, nq)


def _check(tensors, grad, dtype, scale, name):
    ref = _grads(lambda *t: _math64(*t, scale), tensors, grad)
    low = [t.to(dtype) if t is not None else None for t in tensors]
    eager = _grads(lambda *t: _math_eager(*t, scale), low, grad.to(dtype))
    out = _grads(lambda *t: self_attention(*t, scale=scale), low, grad.to(dtype))
    assert out[0].dtype == dtype
    assert_close_3way(out, ref, eager, name=name)


# ----------------------------------------------------------------------------------------------
# dispatch and blocking
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, path", [(torch.float32, "cpu"), (torch.float16, "cpu"), (torch.bfloat16, "cpu"),
                                         (torch.float64, "batched")], ids=str)
def test_dispatch(monkeypatch, dtype, path):
    """fp32/fp16/bf16 CPU tensors run the blocked path forward and backward; float64 the batched one."""
    calls = []
    for fn in ("_fwd_cpu", "_bwd_cpu", "_fwd_torch", "_bwd_torch"):
        orig = getattr(SA, fn)
        monkeypatch.setattr(SA, fn, lambda *a, _fn=fn, _orig=orig: calls.append(_fn) or _orig(*a))
    (q, k, v, x, gamma), grad = _inputs(2, 4, 6, 10, 10, True)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, x, gamma)]
    self_attention(*leaves).backward(grad.to(dtype))
    want = ["_fwd_cpu", "_bwd_cpu"] if path == "cpu" else ["_fwd_torch", "_bwd_torch"]
    assert calls == want


def test_cpu_rows_and_split(monkeypatch):
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", None)
    # SAGAN 64x64 (N=4096): 128 rows x 4096 keys = 2**19 scores (2 MiB fp32) per block; pooled keys: 4x the rows
    assert cpu_rows(4096, 4096) == CPU_BLOCK_ELEMS // 4096 == 128
    assert cpu_rows(4096, 1024) == 512
    assert cpu_rows(64, 64) == 64  # never more rows than there are
    assert cpu_rows(0, 7) == 1 and cpu_rows(5, 10 ** 7) == 1  # never zero
    # forward: about 8 tasks per worker; a multiple of the block rows
    assert cpu_split(8, 4096, 128, 2, backward=False) == 2048
    assert cpu_split(1, 4096, 128, 2, backward=False) == 256
    assert cpu_split(1, 100, 64, 16, backward=False) == 64
    # backward: whole samples with 4 per worker, else at most 2 x workers chunks per sample
    assert cpu_split(8, 4096, 128, 2, backward=True) == 4096
    assert cpu_split(1, 4096, 128, 2, backward=True) == 1024
    assert cpu_split(3, 4096, 128, 2, backward=True) == 1408  # 3 chunks, rounded up to whole blocks
    assert cpu_split(2, 4096, 128, 1, backward=True) == 2048
    # many workers: still at most 4 chunks (4 fp32 partials of dK/dV) per sample
    assert cpu_split(1, 4096, 128, 16, backward=True) == 1024
    assert cpu_split(2, 0, 1, 2, backward=True) == 1
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", 3000)
    assert cpu_rows(200, 200) == 15


@pytest.fixture(params=[1, 3], ids=["1worker", "3workers"])
def workers(request, monkeypatch):
    """The CPU path with its tasks run inline (1) and on three pool threads (3: whatever CI's thread count)."""
    monkeypatch.setattr(_cpu_pool, "workers", lambda: request.param)
    return request.param


# ----------------------------------------------------------------------------------------------
# against float64
# ----------------------------------------------------------------------------------------------
# (budget, B, d_qk, d_v, NQ, NK): row blocks with a ragged last one; samples split into chunks (B < 4 x
# workers) and whole-sample tasks; one block; pooled keys; d_qk > d_v; d_v > 128.
CASES = [
    ("1000", 2, 5, 24, 97, 41),
    ("1000", 5, 4, 12, 20, 23),
    (None, 3, 16, 128, 64, 64),
    ("4096", 2, 16, 40, 130, 33),
    ("2000", 1, 40, 24, 50, 70),
    (None, 2, 8, 136, 45, 12),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "o"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_float64(monkeypatch, workers, case, residual, dtype):
    budget, b, d, dv, nq, nk = case
    if budget is None:
        monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", None)
    else:
        monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", int(budget))
    tensors, grad = _inputs(b, d, dv, nq, nk, residual)
    _check(tensors, grad, dtype, 0.3 if nk != nq else 1.0, f"cpu path {case} {dtype}")


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "o"])
def test_large_logits_many_blocks(monkeypatch, workers, residual):
    """|q^T k| ~ 1e3 (SAGAN's scale 1 with big projections), several row blocks: finite and as
    accurate as eager fp32."""
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", 700)
    tensors, grad = _inputs(2, 4, 24, 70, 70, residual, mult=16.0)
    q, k = tensors[0], tensors[1]
    assert (q.transpose(1, 2) @ k).abs().max() > 1e3
    _check(tensors, grad, torch.float32, 1.0, "large logits")


def test_lse_is_the_logsumexp(monkeypatch):
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", 500)
    (q, k, v, _, _), _ = _inputs(3, 6, 10, 37, 29, False, mult=3.0)
    out, o, lse = self_attention_op(q.float(), k.float(), v.float(), None, None, 0.5, True)
    ref = torch.logsumexp(0.5 * q.transpose(1, 2) @ k, -1)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(o, out)  # without a residual, out is o
    assert lse.dtype == o.dtype == torch.float32


def test_no_queries():
    """NQ = 0: empty output, zero key/value gradients (no block runs)."""
    k, v = torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 4, 5, requires_grad=True)
    q, x = torch.randn(2, 3, 0, requires_grad=True), torch.randn(2, 4, 0, requires_grad=True)
    gamma = torch.tensor([0.5], requires_grad=True)
    out = self_attention(q, k, v, x, gamma)
    assert out.shape == (2, 4, 0)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))
    assert torch.equal(gamma.grad, torch.zeros_like(gamma))


class _CountOps(TorchDispatchMode):
    """The aten ops (views excluded) a piece of code issues, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_few_ops_per_block(monkeypatch):
    """Per block the forward issues at most 7 ops (2 GEMMs, softmax, max, gather, 2 on the (rows,) lse), the
    backward 8 (5 GEMMs, softmax, its fused backward, the dQ scaling), each on one thread in a worker. At SAGAN
    64x64 (N=4096) a block is 128 rows. (Counted with one worker: the tasks run inline, where the dispatch
    mode sees them.)"""
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 1)
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", 16 * 256)
    b, d, dv, n = 2, 4, 8, 256
    blocks = b * (n // cpu_rows(n, n))
    assert blocks == 32
    tensors, grad = _inputs(b, d, dv, n, n, True)
    (q, k, v, x, gamma), grad = [t.float() for t in tensors], grad.float()
    out, o, lse = self_attention_op(q, k, v, x, gamma, 1.0, True)
    with _CountOps() as fwd:
        SA._fwd_cpu(q, k, v, x, gamma, 1.0, torch.empty_like(x), torch.empty_like(x), torch.empty(b, n))
    with _CountOps() as bwd:
        SA._bwd_cpu(grad, q, k, v, o, gamma, 1.0, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                    torch.empty(b, n))
    tasks_fwd = b * -(-n // cpu_split(b, n, cpu_rows(n, n), 1, backward=False))
    tasks_bwd = b * -(-n // cpu_split(b, n, cpu_rows(n, n), 1, backward=True))
    assert fwd.ops.count("aten.mm") == 2 * blocks
    assert len(fwd.ops) <= 7 * blocks + 2 * tasks_fwd + 16, fwd.ops  # + each task's two buffers
    assert len(bwd.ops) <= 8 * blocks + 8 * tasks_bwd + 40, bwd.ops  # + buffers, rowsum, dK/dV scaling


def test_tasks_run_on_workers_and_repeat_bitwise(monkeypatch):
    """With 3 workers the blocks run on the pool's threads, single-threaded, and two runs give the same bits
    (partial dK/dV sums are added in chunk order, whichever worker computed them)."""
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 3)
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", 16 * 64)
    seen = set()
    orig = SA._softmax_into

    def spy(s, p):
        import threading
        seen.add((threading.current_thread().name, torch.get_num_threads()))
        return orig(s, p)

    monkeypatch.setattr(SA, "_softmax_into", spy)
    tensors, grad = _inputs(1, 4, 8, 300, 200, True)
    tensors = [t.float() for t in tensors]
    runs = [_grads(lambda *t: self_attention(*t), tensors, grad.float()) for _ in range(2)]
    assert seen and all(name.startswith("attnfast-cpu-") and nt == 1 for name, nt in seen), seen
    for a, b in zip(*runs):
        assert torch.equal(a, b)
