"""Honest baselines (benchmarks/harness.py, providers.py): a "compile" number must come from compiled graphs.

The old CBAM suite built a block per test and compiled each: Dynamo recompiled the same ``forward`` until its
recompile limit (8) and then ran every later case eagerly, silently, and the numbers were reported as
"compile". Now a compiled provider counts its compiled-graph calls, ``harness.measure`` refuses a timing whose
calls ran no compiled graph or compiled one, providers are cached per shape parameters, and benchmark
processes allow more recompiles and make hitting the limit an error. These run with the ``eager`` backend
(Dynamo traces, nothing is code-generated) to stay fast.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import attnfast.config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import harness  # noqa: E402
import providers  # noqa: E402


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setenv("ATTNFAST_BENCH_COMPILE_BACKEND", "eager")
    monkeypatch.setattr(harness, "_COMPILED", {})
    for fn in (providers._grid_modules, providers._cbam_modules, providers.sagan_modules, providers._sagan_table):
        fn.cache_clear()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _timed_once(fn, *args):
    """Warm up (compiles), then one 'timed' call; the counter's verdict on that call."""
    fn(*args)
    before = fn.counter.snapshot()
    fn(*args)
    return fn.counter.verdict(before, 1)


def test_compiled_stays_compiled_past_dynamos_default_recompile_limit(eager_backend):
    """One function at 12 shapes (the old suite's 16 CBAM cases hit the default limit of 8 at the 9th):
    every shape runs its own compiled graph."""
    fn = providers.gate(["compile"])["compile"]
    for n in range(1, 13):
        m, t = torch.randn(2, n, 3, 3), torch.randn(2, n, 3, 3)
        verdict = _timed_once(fn, m, t)
        assert verdict["valid"], (n, verdict)
    assert fn.counter.graphs == 12


def test_cbam_blocks_are_built_once_per_shape_parameters(eager_backend):
    """The suite's order (two batches per channel count): one block per (channels, dtype), compiled once per
    input shape, every timed call compiled."""
    seen = {}
    for b in (2, 3):
        for c in (16, 32):
            table = providers.cbam(c, torch.float32, "cpu")
            assert seen.setdefault(c, table["eager"]) is table["eager"]
            assert table["compile"].original is table["eager"]
            x = torch.randn(b, c, 5, 5, requires_grad=True)
            assert _timed_once(table["compile"], x)["valid"]


class FakeBenchmark:
    """pytest-benchmark's fixture, as much as harness.measure uses: pedantic runs the function ``rounds`` times."""

    disabled = False

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, setup=None, rounds=1, iterations=1, warmup_rounds=0):
        for _ in range(rounds):
            args, kwargs = setup() if setup else ((), {})
            fn(*args, **kwargs)


def test_measure_records_compile_counts(eager_backend):
    fn = providers.gate(["compile"])["compile"]
    bench = FakeBenchmark()
    m, t = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)
    harness.measure(bench, fn, [m, t], "fwd+bwd", rounds=3)
    c = bench.extra_info["compile"]
    assert c["valid"] and c["calls"] == 3 and c["graph_calls"] >= 3 and c["backend"] == "eager", c


def test_measure_refuses_a_compile_baseline_that_ran_eagerly(eager_backend):
    """Past the recompile limit Dynamo runs the function eagerly (when not told to fail): the timing is
    refused and says why."""
    fn = harness.Compiled(lambda m, t: torch.sigmoid(m) * t)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):
        fn(torch.randn(3), torch.randn(3))  # the one graph the limit allows
        bench = FakeBenchmark()
        m, t = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
        with pytest.raises(RuntimeError, match="invalid compile baseline: .*eager fall-back"):
            harness.measure(bench, fn, [m, t], "fwd", rounds=2)
    assert bench.extra_info["compile"]["valid"] is False and bench.extra_info["compile"]["graph_calls"] == 0


def test_chunked_provider_runs_backward_on_its_backend_too(monkeypatch):
    """attnfast's backward dispatches again: the chunked provider's context covers it (harness.measure
    runs forward and backward inside it)."""
    monkeypatch.setattr(attnfast.config, "BACKEND", "auto")
    chunked = providers.sagan(16, torch.float32, "cpu", ["chunked"])["chunked"]
    seen = []
    from attnfast import _dispatch

    orig = _dispatch.backend_setting
    monkeypatch.setattr(_dispatch, "backend_setting", lambda: seen.append(orig()) or orig())
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    with harness.provider_context(chunked):
        chunked(x).sum().backward()
    assert seen and set(seen) == {"torch"}, seen
    assert attnfast.config.BACKEND == "auto"


# ----------------------------------------------------------------------------------------------
# largest batch
# ----------------------------------------------------------------------------------------------
def _fits(limit, per=10, base=1000):
    calls = []

    def fits(b):
        calls.append(b)
        return None if b > limit else base + per * b

    return fits, calls


@pytest.mark.parametrize("limit", [1, 5, 37, 150, 1000])
@pytest.mark.parametrize("budget_scale", [1.0, 1.3, 0.7])  # the prediction right, too high, too low
def test_largest_batch_brackets_the_limit(limit, budget_scale):
    fits, calls = _fits(limit)
    r = providers.largest_batch(fits, 8, 2048, budget_bytes=1000 + 10 * limit * budget_scale)
    assert r["max_batch"] <= limit < r["first_failing"], r
    assert r["exact"] and r["first_failing"] - r["max_batch"] <= max(1, int(r["max_batch"] / 32))
    assert len(calls) <= 12 and [b for b, _ in r["probes"]] == calls


def test_largest_batch_capped_and_nothing_fits():
    fits, _ = _fits(10 ** 6)
    r = providers.largest_batch(fits, 8, 64, budget_bytes=10 ** 12)
    assert r == {**r, "max_batch": 64, "first_failing": None, "capped": True, "exact": False}
    fits, calls = _fits(0)
    r = providers.largest_batch(fits, 8, 64)
    assert r["max_batch"] == 0 and r["first_failing"] == 1 and calls == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="positive"):
        providers.largest_batch(fits, 0, 64)


class FakeStep:
    """A training step that runs out of memory above ``limit`` (what providers.step_largest_batch drives)."""

    def __init__(self, limit):
        self.limit, self.batches, self.released = limit, [], 0

    def inputs(self, b):
        return b, None

    def __call__(self, b, _):
        self.batches.append(b)
        if b > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def release(self):
        self.released += 1


def test_step_largest_batch_warms_up_then_searches_and_reports_partial_results():
    step = FakeStep(limit=21)
    r = providers.step_largest_batch(step, 8, 64, peak=lambda fn: fn())  # no allocator: the batch stands in
    assert step.batches[0] == 1, "Adam's state first, outside any probe"
    assert r["max_batch"] == 21 and r["first_failing"] == 22 and step.released == len(step.batches)
    step = FakeStep(limit=21)
    r = providers.step_largest_batch(step, 8, 64, peak=lambda fn: fn(), deadline=0.0)
    assert r["max_batch"] is None and "budget" in r["error"] and r["probes"] == []

    def bad_peak(fn):
        fn()
        raise RuntimeError("illegal memory access")

    r = providers.step_largest_batch(FakeStep(limit=21), 8, 64, peak=bad_peak)
    assert r["max_batch"] is None and "illegal memory access" in r["error"]
