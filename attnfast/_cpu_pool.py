"""CPU work as tasks that single-threaded workers take one at a time: what the CPU paths use to stay fast on
busy cores.

A multi-threaded PyTorch op is one OpenMP parallel region: each of its T threads gets a fixed 1/T of the work and
the op ends when the slowest thread does. When other processes share the cores (DataLoader workers, another
job), one of the threads shares its core, every region waits for it, and threads that fell asleep between
regions wait to be scheduled again: a path made of many ops pays that once per op
(``benchmarks/results/cpu_load.md`` has the measurements, before and after this pool).

``run_tasks(fn, tasks)`` instead has ``workers()`` runners take the tasks: the calling thread and ``workers() - 1``
threads of a pool, each running its PyTorch ops on one thread (no parallel regions). A runner takes the next task
when it finishes one, so a runner slowed by a busy core simply does fewer tasks, and a task can keep its working
set in that core's cache between ops. The caller starts at once and waits only for the tasks a worker has
started: small work finishes in the caller before a worker wakes and costs no handoff. PyTorch releases the GIL
inside its ops, so the threads compute at the same time. While it runs tasks the caller's own thread count is 1
(``torch.set_num_threads``, restored after; it is also the default for threads PyTorch starts meanwhile).

A cost this cannot avoid (measured on the 2-core machine, torch 2.14.1): after every multi-threaded op, such as
the convolution before an attention block, GNU OpenMP's idle team threads spin for about 5-9 ms before they
sleep, holding a core the runners could use; a parallel region would reuse them. Short task phases right after
such an op therefore run with about one core less than the machine has.

What the workers inherit from the calling thread, per call: grad mode off, the caller's inference mode (tensors
made under ``torch.inference_mode`` can only be written there) and its flush-denormal setting. Results do not
depend on which worker runs a task; the callers' task splits depend on ``workers()`` and the batch size, so
results can differ in the last bits between thread counts (never between runs).

The pools are created on first use: one per thread count (the calling thread's ``torch.get_num_threads()``),
never stopped while the process lives (so a thread with another count never cancels queued work). Each worker
sets its own OpenMP/MKL thread count to 1; ``torch.set_num_threads`` also sets the default for threads started
later, so the creator restores that once every worker is ready. A forked child starts without the parent's
threads and creates its own pools. The tasks run in the calling thread instead with one thread, one task, a call
made from inside a task, or a PyTorch whose parallel backend is not OpenMP (there ``set_num_threads`` is
process-wide). A KeyboardInterrupt (or any exception) in the waiting caller cancels the tasks not yet started.
"""
from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from typing import Callable, Iterable

import torch

__all__ = ["batch_chunks", "run_chunks", "run_tasks", "single_threaded", "small", "workers"]

# batch_chunks' target: this many chunks per worker while there are samples for them (a worker on a busy core then
# costs at most a small chunk), fewer where a chunk would fall below cpu_elems.
TASKS_PER_WORKER = 4
# ... and chunks of at least this many elements of per_sample: below it a task's ops cost less than handing it over
# (grid attention at the main job's shapes, B=32 with 32x8x8 and 64x4x4 maps, fwd+bwd of both blocks: 12.1 ms as
# 8 tasks of 8k elements, 4.7 ms as one task, eager 4.2 ms; 2026-12-03, 2 quiet cores)
MIN_TASK_ELEMS = 1 << 16
_pools: dict = {}
_pools_lock = threading.Lock()
_local = threading.local()


@functools.lru_cache(maxsize=None)
def _per_thread_counts() -> bool:
    """Whether this PyTorch's intra-op thread count is per thread (its OpenMP backend)."""
    try:
        return "parallel backend: OpenMP" in torch.__config__.parallel_info()
    except Exception:  # pragma: no cover - a build without the query
        return False


class _Pool:
    """``n`` worker threads taking jobs from one queue."""

    def __init__(self, n: int):
        self.n, self.pid = n, os.getpid()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        own = torch.get_num_threads()
        ready = threading.Barrier(n + 1)
        try:
            for i in range(n):
                threading.Thread(target=self._work, args=(ready,), name=f"attnfast-cpu-{i}", daemon=True).start()
            ready.wait()
        except BaseException:
            ready.abort()  # the started workers leave
            raise
        finally:
            torch.set_num_threads(own)  # the default for threads started later, which each worker set to 1

    def _work(self, ready: threading.Barrier) -> None:
        _local.worker = True
        torch.get_num_threads()  # PyTorch's per-thread setup first: it would reset the count set below
        torch.set_num_threads(1)
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        while True:
            self.jobs.get()()


def workers() -> int:
    """How many tasks run at once: the calling thread's ``torch.get_num_threads()`` (1 where the thread count is
    not per thread, or where ``ATTNFAST_CPU_WORKERS=1``, the one value that variable takes: tasks run in the
    calling thread, each op multi-threaded as eager's)."""
    if os.environ.get("ATTNFAST_CPU_WORKERS", "").strip() == "1" or not _per_thread_counts():
        return 1
    return max(1, torch.get_num_threads())


def in_worker() -> bool:
    """Whether the calling thread is one of the pools' workers."""
    return getattr(_local, "worker", False)


def _get_pool(n: int) -> _Pool:
    """The pool of callers with ``n`` threads: ``n - 1`` workers (the caller is the n-th runner)."""
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None or pool.pid != os.getpid():
            pool = _pools[n] = _Pool(n - 1)
        return pool


def _forget_pools() -> None:  # in a forked child: the parent's threads do not exist there
    global _pools, _pools_lock
    _pools, _pools_lock = {}, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _flush_denormal() -> bool:
    """Whether the calling thread flushes denormals (``torch.set_flush_denormal``): a denormal survives x * 1
    only when it does not."""
    return bool(torch.tensor(1e-39, dtype=torch.float32).mul(1.0).item() == 0.0)


def _caller_modes():
    return torch.is_inference_mode_enabled(), _flush_denormal()


def _in_modes(modes, fn, *args):
    """``fn(*args)`` with grad mode off and the caller's inference and flush-denormal settings."""
    inference, flush = modes
    if getattr(_local, "flush", False) != flush:
        torch.set_flush_denormal(flush)
        _local.flush = flush
    with torch.inference_mode(inference), torch.no_grad():  # in this order: inference_mode(False) turns grad on
        return fn(*args)


def run_tasks(fn: Callable[[object], None], tasks: Iterable, limit: int = 0) -> None:
    """Calls ``fn(task)`` for every task, ``workers()`` at a time (at most ``limit`` when given: a bound on what
    the tasks in flight hold in memory), in any order and on any worker; returns when all are done. The first
    exception a task raises is raised here once the running tasks have finished (tasks not yet started are
    skipped); an exception in the caller while it waits (Ctrl-C) cancels the tasks not yet started and is
    re-raised at once."""
    tasks = list(tasks)
    n = min(workers(), len(tasks), limit or len(tasks))
    if n <= 1 or in_worker():
        with torch.no_grad():
            for t in tasks:
                fn(t)
        return
    _on_pool(fn, tasks, n)


def _on_pool(fn: Callable[[object], None], tasks: list, n: int) -> None:
    """``run_tasks``' pool part: the calling thread and ``n - 1`` workers of its pool are the runners; each takes
    the tasks one at a time. The caller starts at once and waits only for tasks a worker has started: a worker
    that wakes after the last task was taken leaves without being waited for (small work then costs no
    handoff)."""
    pool = _get_pool(workers())
    modes = _caller_modes()
    lock = threading.Lock()
    done = threading.Event()
    state = {"next": 0, "finished": 0, "stopped": False, "error": None, "cancelled": False}

    def runner(run=_in_modes):  # takes this call's tasks one at a time until none is left
        while True:
            with lock:
                i = state["next"]
                if i >= len(tasks) or state["error"] is not None or state["cancelled"]:
                    return
                state["next"] = i + 1
            try:
                run(modes, fn, tasks[i])
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with lock:
                    if state["error"] is None:
                        state["error"] = e
            finally:
                with lock:
                    state["finished"] += 1
                    if state["stopped"] and state["finished"] == state["next"]:
                        done.set()

    for _ in range(n - 1):
        pool.jobs.put(runner)
    try:
        with _as_worker():
            runner(lambda _modes, f, t: f(t))  # the caller's modes are its own
        with lock:  # no task starts from here on: wait for the ones the workers are running
            state["stopped"] = True
            if state["finished"] == state["next"]:
                done.set()
        done.wait()
    except BaseException:
        with lock:
            state["cancelled"] = True
        raise
    if state["error"] is not None:
        raise state["error"]


@contextlib.contextmanager
def _as_worker():
    """The calling thread as a runner: its ops single-threaded, grad mode off, calls from its tasks inline."""
    own, was = torch.get_num_threads(), in_worker()
    _local.worker = True
    if own != 1:
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        if own != 1:
            torch.set_num_threads(own)
        _local.worker = was


def single_threaded(fn: Callable, *args):
    """``fn(*args)`` in the calling thread with its ops single-threaded, and its result (grad mode off, as in a
    task). For the small batch-wide work between two task phases (a conv or a BatchNorm on (B, 2, H, W) maps):
    multi-threaded, each of its ops would be a parallel region too short to pay for waking every thread, which on
    busy cores costs more than the op; handed to a worker, the handoff would cost more than the work."""
    if workers() <= 1 or in_worker():
        with torch.no_grad():
            return fn(*args)
    with _as_worker():
        return fn(*args)


# ----------------------------------------------------------------------------------------------
# the ops' batch chunks: one spelling for every op's PyTorch path
# ----------------------------------------------------------------------------------------------
def batch_chunks(batch: int, per_sample: int, device: torch.device, *, cpu_elems: int, elems: int) -> list:
    """(b0, b1) sample ranges of an op's PyTorch path, each of at most ``elems`` elements of ``per_sample`` per
    sample (one sample at least); on CPU, where each is a task, at most ``cpu_elems``, at least ``MIN_TASK_ELEMS``
    (where the batch has them) and about 4 per worker while there are samples for them."""
    if device.type == "cpu":
        step = min(cpu_elems // max(1, per_sample), -(-batch // (TASKS_PER_WORKER * workers())))
        step = max(step, -(-MIN_TASK_ELEMS // max(1, per_sample)))
    else:
        step = elems // max(1, per_sample)
    step = max(1, step)
    return [(b0, min(batch, b0 + step)) for b0 in range(0, batch, step)]


def run_chunks(fn: Callable[[int], None], chunks: list, device: torch.device, *, per_sample: int = 0,
               inflight: int = 0) -> None:
    """``fn(i)`` for every chunk index: on CPU as tasks, and with ``inflight`` at most ``inflight`` elements of
    ``per_sample`` per sample in the chunks running at once (one chunk at least: each holds a few temporaries
    of that size); elsewhere in order in the calling thread. Each chunk writes its own rows; sums over chunks
    go through per-chunk partials added in chunk order afterwards (deterministic whatever the scheduling)."""
    if device.type != "cpu":
        for i in range(len(chunks)):
            fn(i)
        return
    limit = 0
    if inflight and chunks:
        limit = max(1, inflight // max(1, per_sample * (chunks[0][1] - chunks[0][0])))
    run_tasks(fn, range(len(chunks)), limit=limit)


def small(fn: Callable, device: torch.device):
    """``fn()`` for the small batch-wide work between two chunk phases: on CPU ``single_threaded``, elsewhere in
    the calling thread."""
    return single_threaded(fn) if device.type == "cpu" else fn()
