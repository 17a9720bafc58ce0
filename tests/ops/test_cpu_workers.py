"""Every op whose CPU path runs attnfast._cpu_pool tasks, on 3 workers: under torch.inference_mode (the outputs
are inference tensors, written by the workers) and with grad, the same numbers as inline (1 worker).
MIN_TASK_ELEMS (and CBAM's own floor) is 0 here so that these small shapes split into several tasks, and a spy
checks that the pool really ran some."""
import pytest
import torch

import attnfast
from attnfast import _cpu_pool
from attnfast.ops import attention_gate_logits, attention_pool, residual_gate


def _modules():
    torch.manual_seed(0)
    cbam = attnfast.CBAM(16).eval()
    grid = attnfast.GridAttention(8, 12, 8, up_factor=2)
    sa = attnfast.SelfAttention2d(16, tuple_output=False)
    with torch.no_grad():
        sa.gamma.fill_(0.5)
    x16, l8, g12 = torch.randn(3, 16, 9, 9), torch.randn(3, 8, 12, 12), torch.randn(3, 12, 6, 6)
    m, t = torch.randn(3, 4, 40, 40), torch.randn(3, 4, 40, 40)
    w, bias, gmap = torch.randn(1, 8, 1, 1), torch.randn(1), torch.randn(3, 8, 12, 12)
    xg, gg = torch.randn(3, 6, 16, 16), torch.randn(3, 10, 8, 8)
    gate_w = (torch.randn(4, 6, 2, 2), torch.randn(4, 10, 1, 1), torch.randn(4), torch.randn(1, 4, 1, 1),
              torch.randn(1))
    return {
        "attention_pool": lambda: attention_pool(l8, w, bias, gmap, normalize="sigmoid")[1],
        "attention_gate": lambda: attention_gate_logits(xg, gg, *gate_w, stride=2),
        "cbam": lambda: cbam(x16),
        "grid": lambda: grid(l8, g12)[1],
        "self_attention": lambda: sa(x16),
        "residual_gate": lambda: residual_gate(m, t),
    }


@pytest.fixture
def pooled(monkeypatch):
    """Small shapes in several tasks; yields the task counts of the calls that went to the pool."""
    monkeypatch.setattr(_cpu_pool, "MIN_TASK_ELEMS", 0)
    monkeypatch.setattr(__import__("sys").modules["attnfast.ops.cbam"], "CPU_MIN_CHUNK_ELEMENTS", 0)
    calls, orig = [], _cpu_pool._on_pool

    def spy(fn, tasks, n):
        calls.append(len(tasks))
        return orig(fn, tasks, n)

    monkeypatch.setattr(_cpu_pool, "_on_pool", spy)
    yield calls
    assert any(c > 1 for c in calls), f"no call reached the pool with several tasks: {calls}"


@pytest.mark.parametrize("op", ["cbam", "grid", "self_attention", "residual_gate", "attention_pool",
                                "attention_gate"])
def test_inference_mode_and_grad_on_three_workers(torch_backend, monkeypatch, pooled, op):
    RG = __import__("sys").modules["attnfast.ops.residual_gate"]
    monkeypatch.setattr(RG, "CPU_CHUNK_ELEMS", 1000)  # several chunks for the gate too
    fn = _modules()[op]
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 1)
    want = fn().detach()
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 3)
    with torch.inference_mode():
        got = fn()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert fn().requires_grad or op not in ("cbam", "grid", "self_attention")


@pytest.mark.parametrize("op", ["attention_pool", "attention_gate"])
def test_weight_gradients_on_three_workers_match_inline(torch_backend, monkeypatch, pooled, op):
    """The backward's per-chunk partial weight gradients on 3 workers give the inline run's gradients."""
    torch.manual_seed(1)
    torch.set_default_dtype(torch.float64)  # float64: the chunk order is the only difference
    try:
        grads = _weight_grads(monkeypatch, op)
    finally:
        torch.set_default_dtype(torch.float32)
    for a, b in zip(*grads):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _weight_grads(monkeypatch, op):
    if op == "attention_pool":
        l, g = torch.randn(5, 8, 12, 12), torch.randn(5, 8, 12, 12)
        params = [torch.randn(1, 8, 1, 1), torch.randn(1)]
        fn = lambda w, b: attention_pool(l, w, b, g)[1]  # noqa: E731
    else:
        x, g = torch.randn(5, 6, 16, 16), torch.randn(5, 10, 8, 8)
        params = [torch.randn(4, 6, 2, 2), torch.randn(4, 10, 1, 1), torch.randn(4), torch.randn(1, 4, 1, 1),
                  torch.randn(1)]
        fn = lambda *w: attention_gate_logits(x, g, *w, stride=2)  # noqa: E731
    grads = []
    for workers in (1, 3):
        monkeypatch.setattr(_cpu_pool, "workers", lambda w=workers: w)
        leaves = [p.clone().requires_grad_() for p in params]
        fn(*leaves).square().sum().backward()
        grads.append([p.grad for p in leaves])
    return grads
