"""CPU work as tasks that single-threaded workers take one at a time: what the CPU paths use to stay fast on
busy cores.

A multi-threaded PyTorch op is one OpenMP parallel region: each of its T threads gets a fixed 1/T of the work and
the op ends when the slowest thread does. When other processes share the cores (DataLoader workers, another
job), one of the threads shares its core, every region waits for it, and threads that fell asleep between
regions wait to be scheduled again: a path made of many ops pays that once per op. Measured on 2 cores
(``benchmarks/cpu_load.py``), the blocked self-attention path of 7 ops per block went from 1.4 s quiet to 4.3 s
with one busy process, where SDPA's flash kernel (one region) went from 1.6 to 3.2 s.

``run_tasks(fn, tasks)`` instead hands the tasks to ``workers()`` threads whose PyTorch ops each run on one
thread (no parallel regions): a worker takes the next task when it finishes one, so a worker slowed by a busy
core simply does fewer tasks, and a task can keep its working set in that core's cache between ops. The calling
thread waits. Workers run with grad mode off; PyTorch releases the GIL inside its ops, so the threads compute at
the same time.

The pool is created on first use, one per process: ``workers()`` threads (the calling thread's
``torch.get_num_threads()``, re-created when that changes). Each worker sets its own OpenMP/MKL thread count to
1; ``torch.set_num_threads`` also sets the default for threads started later, so the creator restores that to
its own count once every worker is ready. A forked child starts without the parent's threads and creates its own
pool. With one thread, one task, or a call made from inside a task, the tasks run in the calling thread.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable

import torch

__all__ = ["run_tasks", "single_threaded", "workers"]

_pool = None
_pool_lock = threading.Lock()
_local = threading.local()


class _Pool:
    """``n`` worker threads taking jobs from one queue (``None`` stops a worker)."""

    def __init__(self, n: int):
        self.n, self.pid = n, os.getpid()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        own = torch.get_num_threads()
        ready = threading.Barrier(n + 1)
        for i in range(n):
            threading.Thread(target=self._work, args=(ready,), name=f"attnfast-cpu-{i}", daemon=True).start()
        ready.wait()
        torch.set_num_threads(own)  # the default for threads started later, which each worker set to 1

    def _work(self, ready: threading.Barrier) -> None:
        _local.worker = True
        torch.get_num_threads()  # PyTorch's per-thread setup first: it would reset the count set below
        torch.set_num_threads(1)
        ready.wait()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()

    def stop(self) -> None:
        for _ in range(self.n):
            self.jobs.put(None)


def workers() -> int:
    """How many tasks run at once: the calling thread's ``torch.get_num_threads()``."""
    return max(1, torch.get_num_threads())


def in_worker() -> bool:
    """Whether the calling thread is one of the pool's workers."""
    return getattr(_local, "worker", False)


def _get_pool(n: int) -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.n != n or _pool.pid != os.getpid():
            if _pool is not None and _pool.pid == os.getpid():
                _pool.stop()
            _pool = _Pool(n)
        return _pool


def _forget_pool() -> None:  # in a forked child: the parent's threads do not exist there
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_tasks(fn: Callable[[object], None], tasks: Iterable) -> None:
    """Calls ``fn(task)`` for every task, ``workers()`` at a time, in any order and on any worker; returns when
    all are done. The first exception a task raises is raised here (tasks not yet started are skipped)."""
    tasks = list(tasks)
    n = workers()
    if n <= 1 or len(tasks) <= 1 or in_worker():
        with torch.no_grad():
            for t in tasks:
                fn(t)
        return
    pool = _get_pool(n)
    done = threading.Event()
    lock = threading.Lock()
    state = {"left": len(tasks), "error": None}

    def job(task):
        try:
            if state["error"] is None:
                with torch.no_grad():
                    fn(task)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            with lock:
                if state["error"] is None:
                    state["error"] = e
        finally:
            with lock:
                state["left"] -= 1
                if state["left"] == 0:
                    done.set()

    for t in tasks:
        pool.jobs.put(lambda t=t: job(t))
    done.wait()
    if state["error"] is not None:
        raise state["error"]


def single_threaded(fn: Callable, *args):
    """``fn(*args)`` on one worker, its ops single-threaded, and its result; in the calling thread when
    ``run_tasks`` would run tasks there. For the small batch-wide work between two task phases (a conv or a
    BatchNorm on (B, 2, H, W) maps): in the calling thread each of its ops would be a parallel region too short to
    pay for waking every thread, which on busy cores costs more than the op (CBAM at one busy process, 2 cores:
    0.33 s a step with those parts in the calling thread, see benchmarks/results/cpu_load.md)."""
    out = []
    if workers() <= 1 or in_worker():
        return fn(*args)
    pool = _get_pool(workers())
    done = threading.Event()
    err = []

    def job():
        try:
            with torch.no_grad():
                out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            err.append(e)
        finally:
            done.set()

    pool.jobs.put(job)
    done.wait()
    if err:
        raise err[0]
    return out[0]
