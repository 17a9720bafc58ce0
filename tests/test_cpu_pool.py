"""attnfast._cpu_pool: every task runs once, on single-threaded workers, errors come back, thread counts stay."""
import os
import sys
import threading

import pytest
import torch

from attnfast import _cpu_pool


@pytest.fixture
def three(monkeypatch):
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 3)


def test_every_task_once_on_single_threaded_workers(three):
    """The caller and its pool's two workers take the tasks, each running its ops on one thread, grad off."""
    import time

    seen, lock = [], threading.Lock()

    def fn(t):
        time.sleep(0.001)  # long enough for the workers to wake and take some
        with lock:
            seen.append((t, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))

    own = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the caller's own count (2) differs from a runner's, at any suite setting
    try:
        before, me = torch.get_num_threads(), threading.current_thread().name
        _cpu_pool.run_tasks(fn, range(50))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(own)
    assert sorted(t for t, *_ in seen) == list(range(50))
    names = {name for _, name, _, _ in seen}
    assert names <= {me, "attnfast-cpu-0", "attnfast-cpu-1"} and names - {me}  # the workers took some
    assert {nt for _, _, nt, _ in seen} == {1}  # every runner's ops, the caller's too: one thread
    assert {g for *_, g in seen} == {False}  # grad mode off
    assert before == after == 2 and not _cpu_pool.in_worker()  # the caller's state is back


def test_caller_state_back_after_its_own_task_fails(three):
    own = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ZeroDivisionError):
            _cpu_pool.run_tasks(lambda t: 1 / 0, range(1, 3))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(own)
    assert after == 2 and not _cpu_pool.in_worker() and torch.is_grad_enabled()


def test_caller_waits_only_for_tasks_a_worker_took(three):
    """With every worker busy elsewhere the caller runs all tasks itself and returns: it never waits for a
    worker that has not started one of its tasks (small work then costs no handoff)."""
    gate = threading.Event()
    pool = _cpu_pool._get_pool(3)
    for _ in range(pool.n):
        pool.jobs.put(gate.wait)  # both workers blocked
    names = []
    try:
        th = threading.Thread(target=lambda: _cpu_pool.run_tasks(
            lambda t: names.append(threading.current_thread().name), range(5)), name="caller")
        th.start()
        th.join(30)
        assert not th.is_alive(), "the caller waited for a busy worker"
        assert names == ["caller"] * 5
    finally:
        gate.set()


def test_new_threads_keep_the_callers_default(monkeypatch):
    """Workers set their count to 1; a thread started afterwards still gets the process's count (2 here, so a
    missing restore shows whatever count the suite runs with)."""
    own = torch.get_num_threads()
    monkeypatch.setattr(_cpu_pool, "_pools", {})
    torch.set_num_threads(2)
    try:
        _cpu_pool.run_tasks(lambda t: None, range(4))  # a fresh 2-worker pool
        assert _cpu_pool._pools[2].n == 1  # the caller is the second runner
        got = []
        th = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
        th.start()
        th.join()
        assert got == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(own)


def test_results_like_inline(three):
    x = torch.randn(8, 64, 64)
    out = torch.empty_like(x)
    _cpu_pool.run_tasks(lambda i: torch.mm(x[i], x[i], out=out[i]), range(8))
    assert torch.equal(out, torch.bmm(x, x))


def test_first_error_is_raised_after_all_stop(three):
    import time

    ran = []

    def fn(t):
        time.sleep(0.002)
        ran.append(t)
        if t == 2:
            raise ValueError("task 2 failed")

    with pytest.raises(ValueError, match="task 2 failed"):
        _cpu_pool.run_tasks(fn, range(40))
    at_raise = len(ran)
    time.sleep(0.05)
    assert len(ran) == at_raise < 40  # the rest was skipped, and nothing ran after the raise
    _cpu_pool.run_tasks(lambda t: ran.append(("after", t)), range(3))  # the pool still works
    assert sum(1 for r in ran if isinstance(r, tuple)) == 3


def test_inline_with_one_worker_or_from_a_task(monkeypatch, three):
    pairs = []
    _cpu_pool.run_tasks(lambda t: _cpu_pool.run_tasks(
        lambda u, outer=threading.current_thread().name: pairs.append((outer, threading.current_thread().name)),
        range(2)), range(3))
    assert len(pairs) == 6 and all(a == b for a, b in pairs)  # nested: inline in the runner, no deadlock
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 1)
    names = []
    _cpu_pool.run_tasks(lambda t: names.append(threading.current_thread().name), range(3))
    assert names == [threading.current_thread().name] * 3


def test_concurrent_callers_with_different_thread_counts(monkeypatch):
    """Callers whose thread counts differ use different pools; none cancels the other's queued work."""
    counts = threading.local()
    monkeypatch.setattr(_cpu_pool, "workers", lambda: getattr(counts, "n", 3))
    results = {}

    def caller(c):
        counts.n = 2 + c % 3
        for rep in range(20):
            acc = []
            _cpu_pool.run_tasks(lambda t: acc.append(t), range(30))
            results[c, rep] = sorted(acc)

    ths = [threading.Thread(target=caller, args=(c,), daemon=True) for c in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert not any(th.is_alive() for th in ths), "a caller hung"
    assert results == {(c, rep): list(range(30)) for c in range(4) for rep in range(20)}


def test_workers_inherit_inference_mode_and_flush_denormal(three):
    """Tensors made under inference_mode can only be written in inference mode; flush-denormal is per thread."""
    with torch.inference_mode():
        out = torch.empty(6, 4)
        _cpu_pool.run_tasks(lambda i: out[i].copy_(torch.full((4,), float(i))), range(6))
    assert torch.equal(out[:, 0], torch.arange(6.0))
    flushed = []
    torch.set_flush_denormal(True)
    try:
        _cpu_pool.run_tasks(lambda i: flushed.append(torch.tensor(1e-39).mul(1.0).item()), range(6))
        assert _cpu_pool.single_threaded(lambda: torch.tensor(1e-39).mul(1.0).item()) == 0.0
    finally:
        torch.set_flush_denormal(False)
    assert flushed == [0.0] * 6
    _cpu_pool.run_tasks(lambda i: flushed.append(torch.tensor(1e-39).mul(1.0).item()), range(6))
    assert all(f != 0.0 for f in flushed[6:])


def test_single_threaded_in_the_caller(three):
    own = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = torch.get_num_threads()
        name, nt, grad = _cpu_pool.single_threaded(
            lambda: (threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(own)
    assert before == after == 2
    assert name == threading.current_thread().name and nt == 1 and grad is False
    with pytest.raises(KeyError):
        _cpu_pool.single_threaded(lambda: {}["missing"])
    assert torch.get_num_threads() == own and not _cpu_pool.in_worker()


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")
def test_forked_child_makes_its_own_pool(three):
    _cpu_pool.run_tasks(lambda t: None, range(4))  # the parent's pool exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's threads are gone; a new pool must serve the tasks
        try:
            __import__("signal").alarm(60)  # a hang kills the child (the test then fails), never the suite
            acc = []
            _cpu_pool.run_tasks(lambda t: acc.append(t), range(10))
            os.write(w, b"ok" if sorted(acc) == list(range(10)) else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 10) == b"ok" and status == 0


def test_env_knob_runs_tasks_in_the_caller(monkeypatch):
    monkeypatch.setenv("ATTNFAST_CPU_WORKERS", "1")
    seen = []
    _cpu_pool.run_tasks(lambda t: seen.append((threading.current_thread().name, torch.get_num_threads())), range(5))
    # in the caller with its own thread count (multi-threaded ops), not as a single-threaded runner
    assert _cpu_pool.workers() == 1 and seen == [(threading.current_thread().name, torch.get_num_threads())] * 5
    monkeypatch.delenv("ATTNFAST_CPU_WORKERS")
    if _cpu_pool._per_thread_counts():  # an OpenMP build (the pip wheels)
        assert _cpu_pool.workers() == max(1, torch.get_num_threads())


def test_batch_chunks_sizes(monkeypatch):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 2)
    monkeypatch.setattr(_cpu_pool, "MIN_TASK_ELEMS", 1 << 16)
    # about 4 chunks per worker while each keeps MIN_TASK_ELEMS: 64 samples of 2**14 -> 8 chunks of 8
    assert _cpu_pool.batch_chunks(64, 1 << 14, cpu, cpu_elems=1 << 20, elems=1 << 22) == [
        (b, b + 8) for b in range(0, 64, 8)]
    # tiny samples: fewer, bigger chunks (4 samples of 2**14 reach MIN_TASK_ELEMS)
    assert _cpu_pool.batch_chunks(8, 1 << 14, cpu, cpu_elems=1 << 20, elems=1 << 22) == [(0, 4), (4, 8)]
    assert _cpu_pool.batch_chunks(32, 2048, cpu, cpu_elems=1 << 20, elems=1 << 22) == [(0, 32)]
    # big samples: cpu_elems bounds a chunk, one sample at least
    assert _cpu_pool.batch_chunks(4, 1 << 21, cpu, cpu_elems=1 << 20, elems=1 << 22) == [(b, b + 1) for b in range(4)]
    # elsewhere: elems only
    assert _cpu_pool.batch_chunks(8, 1 << 20, meta, cpu_elems=1, elems=1 << 22) == [(0, 4), (4, 8)]
