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
    seen, lock = [], threading.Lock()

    def fn(t):
        with lock:
            seen.append((t, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))

    before = torch.get_num_threads()
    _cpu_pool.run_tasks(fn, range(50))
    assert sorted(t for t, *_ in seen) == list(range(50))
    assert {name for _, name, _, _ in seen} <= {f"attnfast-cpu-{i}" for i in range(3)}
    assert {nt for _, _, nt, _ in seen} == {1}  # each worker's own ops: one thread
    assert {g for *_, g in seen} == {False}  # grad mode off in the workers
    assert torch.get_num_threads() == before  # the caller's count is untouched


def test_new_threads_keep_the_callers_default(three):
    """Workers set their count to 1; a thread started afterwards still gets the process's count."""
    _cpu_pool.run_tasks(lambda t: None, range(4))
    want = torch.get_num_threads()
    got = []
    th = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert got == [want]


def test_results_like_inline(three):
    x = torch.randn(8, 64, 64)
    out = torch.empty_like(x)
    _cpu_pool.run_tasks(lambda i: torch.mm(x[i], x[i], out=out[i]), range(8))
    assert torch.equal(out, torch.bmm(x, x))


def test_first_error_is_raised_after_all_stop(three):
    ran = []

    def fn(t):
        ran.append(t)
        if t == 2:
            raise ValueError("task 2 failed")

    with pytest.raises(ValueError, match="task 2 failed"):
        _cpu_pool.run_tasks(fn, range(20))
    _cpu_pool.run_tasks(lambda t: ran.append(("after", t)), range(3))  # the pool still works
    assert sum(1 for r in ran if isinstance(r, tuple)) == 3


def test_inline_with_one_worker_or_from_a_task(monkeypatch, three):
    names = []
    _cpu_pool.run_tasks(lambda t: _cpu_pool.run_tasks(lambda u: names.append(threading.current_thread().name),
                                                       range(2)), range(3))
    assert len(names) == 6 and all(n.startswith("attnfast-cpu-") for n in names)  # nested: inline, no deadlock
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 1)
    names.clear()
    _cpu_pool.run_tasks(lambda t: names.append(threading.current_thread().name), range(3))
    assert names == [threading.current_thread().name] * 3


def test_concurrent_callers(three):
    results = {}

    def caller(c):
        acc = []
        _cpu_pool.run_tasks(lambda t: acc.append(t), range(30))
        results[c] = sorted(acc)

    ths = [threading.Thread(target=caller, args=(c,)) for c in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert results == {c: list(range(30)) for c in range(4)}


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
