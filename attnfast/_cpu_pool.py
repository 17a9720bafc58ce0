"""CPU work as tasks that single-threaded workers take one at a time: what the CPU paths use to stay fast on
busy cores.

A multi-threaded PyTorch op is one OpenMP parallel region: each of its T threads gets a fixed 1/T of the work and
the op ends when the slowest thread does. When other processes share the cores (DataLoader workers, another
job), one of the threads shares its core, every region waits for it, and threads that fell asleep between
regions wait to be scheduled again: a path made of many ops pays that once per op
(``benchmarks/results/cpu_load.md`` has the measurements; the file as of commit 6f285b4 has them from before this
pool).

``run_tasks(fn, tasks)`` instead hands the tasks to ``workers()`` threads whose PyTorch ops each run on one thread
(no parallel regions): a worker takes the next task when it finishes one, so a worker slowed by a busy core simply
does fewer tasks, and a task can keep its working set in that core's cache between ops. The calling thread waits
until the tasks that started have finished and no more will start, not for workers that woke too late to take one;
the runners drop their references to the call's function and tasks before that, so no worker frees the call's
tensors afterwards. PyTorch releases the GIL inside its ops, so the threads compute at the same time. The calling
thread does not run tasks itself: it would have to switch its own thread count to 1 and back around them
(``torch.set_num_threads``), which also rebuilds PyTorch's global pthreadpool and resets the process's default for
new threads on every call.

A cost this does not avoid: after every multi-threaded op, such as the convolution before an attention block,
GNU OpenMP's idle team threads busy-wait (``GOMP_SPINCOUNT``, 300000 spins by default) before they sleep, holding
a core the workers could use, where a parallel region would reuse them. On the 2-core machine (torch 2.14.1,
2026-12-03) that was 4-9 ms of process CPU time while the caller slept after a 4M-element copy (``time.process_time``
around ``time.sleep``; none with ``GOMP_SPINCOUNT=0``). Short task phases right after such an op run with about one
core less. ``OMP_WAIT_POLICY=PASSIVE`` in the environment before the process starts removes the spin, at the cost
of slower wake-ups for PyTorch's own parallel regions.

What the workers inherit from the calling thread, per call: grad mode off, the caller's inference mode (tensors
made under ``torch.inference_mode`` can only be written there) and its flush-denormal setting. Results do not
depend on which worker runs a task; the callers' task splits depend on ``workers()`` and the batch size, so
results can differ in the last bits between thread counts (never between runs).

The pools are created on first use: one per thread count (the calling thread's ``torch.get_num_threads()``),
never stopped while the process lives (so a thread with another count never cancels queued work). Each worker
sets its own OpenMP/MKL thread count to 1; ``torch.set_num_threads`` also sets the default for threads started
later, so the creator restores that once every worker is ready. A forked child starts without the parent's
threads and creates its own pools. ``run_tasks`` runs all tasks in the calling thread instead, with the caller's
own thread count, with one thread, one task (or ``limit`` 1), ``ATTNFAST_CPU_WORKERS=1`` or a PyTorch whose
parallel backend is not OpenMP (there ``set_num_threads`` is process-wide), multi-threaded as eager ops are; and
a call made from inside a task runs inline on that worker, single-threaded. A KeyboardInterrupt
(or any exception) in the waiting caller cancels the tasks not yet started and is raised at once; the running
tasks finish on their own.
"""
from __future__ import annotations

import functools
import os
import queue
import threading
import traceback
from typing import Callable, Iterable

import torch

__all__ = ["batch_chunks", "run_chunks", "run_tasks", "single_threaded", "small", "workers"]

# batch_chunks' target: this many chunks per worker while there are samples for them (a worker on a busy core then
# costs at most a small chunk); more where a chunk would exceed cpu_elems, fewer where it would fall below
# MIN_TASK_ELEMS elements: below that a task's ops cost less than handing it over. Grid attention at the main job's
# shapes (B=32, 32x8x8 and 64x4x4 maps, 65536 and 32768 elements of z per batch; fwd+bwd of both blocks, median of
# 38 in-process steps, 2 quiet cores, torch 2.14.1, 2026-12-03, not committed): 13.0 ms as 8 tasks per block
# (8k and 4k elements each), 4.9 ms as one task per block, eager 4.2 ms. 2**16 is the first block's whole batch;
# the value itself was not swept.
TASKS_PER_WORKER = 4
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
            job = self.jobs.get()
            try:
                job()
            except BaseException:  # noqa: BLE001 - a runner reports its tasks' errors itself: this is a bug there
                traceback.print_exc()  # shown, as an uncaught thread exception would be; the worker lives on
            job = None


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
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None or pool.pid != os.getpid():
            pool = _pools[n] = _Pool(n)
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
    """``run_tasks``' pool part: ``n`` runners on the calling thread's pool take the tasks one at a time; the
    caller waits until the tasks that started have finished and no more will start. A runner drops its
    references to ``fn`` and the task before it counts the task as finished, and the last one drops the call's, so
    a worker that wakes late (it finds nothing to do) or returns after the caller has moved on frees none of the
    call's tensors."""
    pool = _get_pool(workers())
    modes = _caller_modes()
    lock = threading.Lock()
    done = threading.Event()
    state = {"fn": fn, "tasks": tasks, "count": len(tasks), "next": 0, "finished": 0, "error": None,
             "cancelled": False}
    del fn, tasks

    def runner():  # one of n: takes this call's tasks one at a time until none is left
        while True:
            with lock:
                i = state["next"]
                if i >= state["count"] or state["error"] is not None or state["cancelled"]:
                    return
                state["next"] = i + 1
                f, task = state["fn"], state["tasks"][i]
            try:
                _in_modes(modes, f, task)
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with lock:
                    if state["error"] is None:
                        state["error"] = e
            finally:
                f = task = None  # noqa: F841 - not this thread's to free once the caller has moved on
                with lock:
                    state["finished"] += 1
                    last = state["finished"] == state["next"] and (
                        state["next"] >= state["count"] or state["error"] is not None or state["cancelled"])
                    if last:
                        state["fn"] = state["tasks"] = None
                        done.set()

    try:
        for _ in range(n):
            pool.jobs.put(runner)
        done.wait()
    except BaseException:
        with lock:
            state["cancelled"] = True
            if state["finished"] == state["next"]:
                state["fn"] = state["tasks"] = state["error"] = None
        raise
    with lock:  # the error leaves the shared state: its traceback (the task's frames) must not cycle with it
        err, state["error"], state["cancelled"] = state["error"], None, True
    if err is not None:
        try:
            raise err
        finally:
            err = None


def single_threaded(fn: Callable, *args):
    """``fn(*args)`` on one worker, its ops single-threaded, and its result (grad mode off, as in a task); in the
    calling thread where ``workers()`` is 1 or when called from inside a task. For the small batch-wide work between
    two task phases (a conv or a BatchNorm on (B, 2, H, W) maps): in the calling thread each of its ops would be a
    parallel region too short to pay for waking every thread, which on busy cores costs more than the op."""
    if workers() <= 1 or in_worker():
        with torch.no_grad():
            return fn(*args)
    out = []
    _on_pool(lambda _: out.append(fn(*args)), [None], 1)
    return out[0]


# ----------------------------------------------------------------------------------------------
# the ops' batch chunks: one spelling for every op's PyTorch path
# ----------------------------------------------------------------------------------------------
def batch_chunks(batch: int, per_sample: int, device: torch.device, *, cpu_elems: int, elems: int,
                 min_elems: int = 0) -> list:
    """(b0, b1) sample ranges of an op's PyTorch path, each of at most ``elems`` elements of ``per_sample`` per
    sample (one sample at least); on CPU, where each is a task, about ``TASKS_PER_WORKER`` per worker, but with
    at least ``max(MIN_TASK_ELEMS, min_elems)`` elements (whole samples: the last chunk or a small batch can hold
    fewer; an op passes ``min_elems`` where its own measurements favour bigger tasks) and at most ``cpu_elems``,
    which wins over the floor."""
    if device.type == "cpu":
        ps, floor = max(1, per_sample), max(MIN_TASK_ELEMS, min_elems)
        step = min(cpu_elems // ps, max(-(-batch // (TASKS_PER_WORKER * workers())), -(-floor // ps)))
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
