"""attnfast._cpu_pool: every task runs once, on single-threaded workers, errors come back, thread counts stay."""
import os
import sys
import threading
import time

import pytest
import torch

from attnfast import _cpu_pool


@pytest.fixture
def three(monkeypatch):
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 3)


def test_every_task_once_on_single_threaded_workers(three):
    seen, lock = [], threading.Lock()

    def fn(t):
        with lock:
            seen.append((t, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))

    own = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count differs from the workers' at any suite setting
    try:
        _cpu_pool.run_tasks(fn, range(50))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(own)
    assert sorted(t for t, *_ in seen) == list(range(50))
    assert {name for _, name, _, _ in seen} <= {f"attnfast-cpu-{i}" for i in range(3)}
    assert {nt for _, _, nt, _ in seen} == {1}  # each worker's own ops: one thread
    assert {g for *_, g in seen} == {False}  # grad mode off in the workers
    assert after == 2  # the caller's count is untouched


def test_caller_waits_for_the_tasks_not_for_late_workers(three):
    """With two of three workers busy elsewhere, the free one runs every task and the caller returns: it does not
    wait for the runners queued behind the busy workers, which find nothing left when they get to run."""
    gate = threading.Event()
    pool = _cpu_pool._get_pool(3)
    for _ in range(pool.n - 1):
        pool.jobs.put(gate.wait)  # two workers blocked
    names = []
    try:
        th = threading.Thread(target=lambda: _cpu_pool.run_tasks(
            lambda t: names.append(threading.current_thread().name), range(5)), daemon=True)
        th.start()
        th.join(30)
        assert not th.is_alive(), "the caller waited for a worker that never took a task"
        assert len(names) == 5 and len(set(names)) == 1
    finally:
        gate.set()
    drained = threading.Barrier(pool.n + 1)
    for _ in range(pool.n):
        pool.jobs.put(lambda: drained.wait(30))  # behind the late runners in the queue
    drained.wait(30)
    assert len(names) == 5  # the late runners found nothing to run


def test_no_worker_frees_the_calls_objects_after_it_returns(three):
    """A runner that has not started yet (here: queued behind two busy workers) holds none of the call's objects:
    what only the call referenced dies in the caller's thread when the caller lets go of it, not later in a
    worker."""
    freed = []

    class Held:
        def __del__(self):
            freed.append(threading.current_thread().name)

    gate = threading.Event()
    pool = _cpu_pool._get_pool(3)
    for _ in range(pool.n - 1):
        pool.jobs.put(gate.wait)  # two workers blocked: most calls leave runners queued behind them
    def calls():
        for _ in range(20):
            held = Held()
            _cpu_pool.run_tasks(lambda t, h=held: time.sleep(0.001), range(6))
            del held

    try:
        th = threading.Thread(target=calls, name="caller", daemon=True)
        th.start()
        th.join(60)
        assert not th.is_alive(), "a call hung"
        assert freed == ["caller"] * 20
    finally:
        gate.set()


def test_a_worker_survives_a_job_that_raises(three, capsys):
    pool = _cpu_pool._get_pool(3)
    for _ in range(pool.n):
        pool.jobs.put(lambda: 1 / 0)
    names, alive = set(), threading.Barrier(pool.n + 1)
    for _ in range(pool.n):  # one job per worker, each waiting for all: passes only if every worker lives on
        pool.jobs.put(lambda: (names.add(threading.current_thread().name), alive.wait(30)))
    alive.wait(30)
    assert len(names) == pool.n
    assert "ZeroDivisionError" in capsys.readouterr().err  # and the failure was shown


def test_new_threads_keep_the_callers_default(monkeypatch):
    """Workers set their count to 1; a thread started afterwards still gets the process's count (2 here, so a
    missing restore shows whatever count the suite runs with)."""
    own = torch.get_num_threads()
    monkeypatch.setattr(_cpu_pool, "_pools", {})
    torch.set_num_threads(2)
    try:
        _cpu_pool.run_tasks(lambda t: None, range(4))  # a fresh 2-worker pool
        assert _cpu_pool._pools[2].n == 2
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


def test_single_threaded_on_a_worker(three):
    name, nt, grad = _cpu_pool.single_threaded(
        lambda: (threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))
    assert name.startswith("attnfast-cpu-") and nt == 1 and grad is False
    with pytest.raises(KeyError):
        _cpu_pool.single_threaded(lambda: {}["missing"])


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
    # an op's own floor: 8 samples of 2**17 with min_elems 2**20 -> one chunk; cpu_elems still wins
    assert _cpu_pool.batch_chunks(8, 1 << 17, cpu, cpu_elems=1 << 21, elems=1, min_elems=1 << 20) == [(0, 8)]
    assert _cpu_pool.batch_chunks(8, 1 << 17, cpu, cpu_elems=1 << 19, elems=1, min_elems=1 << 20) == [(0, 4), (4, 8)]
    # elsewhere: elems only
    assert _cpu_pool.batch_chunks(8, 1 << 20, meta, cpu_elems=1, elems=1 << 22) == [(0, 4), (4, 8)]
