"""Shared machinery for the pytest-benchmark suites in ``benchmarks/``.

``measure(benchmark, fn, inputs, mode, **extra)`` times ``fn(*inputs)`` in one of three modes:

- ``fwd``: the training forward (inputs that require grad keep their autograd graph);
- ``bwd``: backward only (the forward runs untimed in pytest-benchmark's ``setup``);
- ``fwd+bwd``: both.

It also records in ``benchmark.extra_info``: peak memory growth during one extra run
(``torch.cuda.max_memory_allocated`` on a GPU; process peak RSS growth, sampled, on a CPU), the bytes
autograd saved for backward (counted with ``saved_tensors_hooks``, device-independent), and the
device, versions and date, so a result file says where it came from.

Compile baselines go through ``compiled(fn)``: ``torch.compile(fn, dynamic=False)`` with a backend that
counts the graphs it compiles and every call of a compiled graph (``CompileCounter``). ``measure`` records
those counts and raises when a timed call ran no compiled graph or a graph was (re)compiled while timing,
so a "compile" number is never eager PyTorch in disguise (Dynamo silently falls back to eager once a
function hits its recompile limit). The backend is ``$ATTNFAST_BENCH_COMPILE_BACKEND`` (default
``inductor``; the CI smoke, ``--benchmark-disable``, uses ``aot_eager``: Dynamo and AOTAutograd trace the
same graphs, without inductor's minutes of CPU codegen); each result names it.

Run a suite with ``pytest benchmarks/<file> --benchmark-only --benchmark-json benchmarks/results/<name>.json``;
CI runs the tiny CPU shapes once with ``--benchmark-disable``. The GPU runs are ``benchmarks/gpu_run.sh``.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import platform
import threading
import time

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if on_gpu() else "cpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@functools.lru_cache(maxsize=None)
def device_info() -> dict:
    info = {
        "device": torch.cuda.get_device_name() if on_gpu() else f"CPU: {_cpu_model()} ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "not installed"
    if on_gpu():
        info["cuda"] = torch.version.cuda
    info.update(provenance())
    return info


def provenance(env: dict | None = None) -> dict:
    """The code and settings a result came from: the git commit of this checkout (``+dirty`` when tracked files
    outside ``benchmarks/results`` differ from it; "unknown (...)" where git fails or this is not the checkout's
    own repository; a note when the imported attnfast is not this checkout's), and ``threading_env(env)``."""
    import attnfast
    from gpu_wheel import _git  # the benchmarks' one way to ask git (None where it fails)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    top = _git(root, "rev-parse", "--show-toplevel")
    head = _git(root, "rev-parse", "--short", "HEAD")
    # result files a run before this one rewrote do not count: they are outputs, not the measured code
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    if top is None or head is None or status is None:
        commit = "unknown (git failed here)"
    elif os.path.realpath(top) != os.path.realpath(root):
        commit = "unknown (not this checkout's git repository)"
    else:
        commit = head + ("+dirty" if status else "")
    here = os.path.realpath(os.path.dirname(attnfast.__file__))
    if not here.startswith(os.path.realpath(root) + os.sep):
        commit += f" (attnfast imported from {here}, not this checkout)"
    return {"commit": commit, "threading_env": threading_env(env)}


def threading_env(env: dict | None = None) -> dict:
    """The variables of ``env`` (default ``os.environ``; pass the measured processes' own) that change CPU
    threading: ``ATTNFAST_*``, ``OMP_*``, ``GOMP_*``, ``KMP_*``, ``MKL_*``."""
    env = os.environ if env is None else env
    return {k: v for k, v in sorted(env.items()) if k.startswith(("ATTNFAST_", "OMP_", "GOMP_", "KMP_", "MKL_"))}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory growth (bytes) over a block: CUDA allocator on a GPU, sampled RSS on a CPU."""

    def __init__(self, cuda: bool | None = None, interval: float = 5e-4):
        self.cuda = on_gpu() if cuda is None else cuda
        self.interval = interval
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss()
            self._max = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak = self._max - self.base
        return False


class SavedBytes:
    """Bytes of tensors autograd saves for backward inside the block (each storage counted once)."""

    def __init__(self):
        self.total = 0
        self._seen = set()

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device)
            if key not in self._seen:
                self._seen.add(key)
                self.total += st.nbytes()
        except Exception:  # fake/meta tensors
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


class AllocatedPeak:
    """Peak bytes held by PyTorch's CPU allocator inside the block, above what it held at entry.

    Deterministic (every c10 CPU allocation and free, in order, from the profiler's memory events),
    unlike sampled RSS; it does not see memory that libraries allocate outside c10 (MKL, oneDNN
    scratch)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        cpu = torch.autograd.DeviceType.CPU
        events = sorted(((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                         if e.name() == "[memory]" and e.device_type() == cpu), key=lambda ev: ev[0])
        cur = self.peak = 0
        for _, nbytes in events:
            cur += nbytes
            self.peak = max(self.peak, cur)
        self.net = cur
        return False


def _as_tuple(out):
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(o for o in out if isinstance(o, torch.Tensor))


def _sync():
    if on_gpu():
        torch.cuda.synchronize()


def provider_context(fn):
    """The context a provider's forward and backward must both run in (``fn.context()``, e.g. an
    ``ATTNFAST_BACKEND`` setting, which attnfast's backward reads again), or a null context."""
    return fn.context() if hasattr(fn, "context") else contextlib.nullcontext()


def measure(benchmark, fn, inputs, mode: str, **kwargs):
    """Benchmark ``fn(*inputs)`` in ``mode``; see the module docstring. ``extra`` goes to extra_info."""
    with provider_context(fn):
        _measure(benchmark, fn, inputs, mode, **kwargs)


def _measure(benchmark, fn, inputs, mode: str, *, rounds: int | None = None, warmup: int = 2, **extra):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode != "fwd" and not leaves and not any(p.requires_grad for p in getattr(fn, "parameters", lambda: [])()):
        raise ValueError("bwd modes need inputs (or fn parameters) that require grad")
    counter = getattr(fn, "counter", None)  # a compiled(...) provider
    calls = [0]  # timed invocations of fn
    probe = _as_tuple(fn(*inputs))
    grads = [torch.randn_like(o) if o.requires_grad or o.grad_fn is not None else None for o in probe]
    pairs = [(o, g) for o, g in zip(probe, grads) if g is not None]
    del probe

    def forward():
        calls[0] += 1
        return _as_tuple(fn(*inputs))

    def backward(outs):
        os_, gs = zip(*[(o, g) for o, g in zip(outs, grads) if g is not None]) if pairs else ((), ())
        if os_:
            torch.autograd.backward(os_, gs)
        for t in leaves:
            t.grad = None

    def run_fwd():
        outs = forward()
        _sync()
        return outs

    def run_full():
        backward(forward())
        _sync()

    def setup_bwd():
        outs = forward()
        _sync()
        return (outs,), {}

    def run_bwd(outs):
        backward(outs)
        _sync()

    for _ in range(warmup):
        run_full() if mode != "fwd" else run_fwd()

    with PeakMemory() as pm, SavedBytes() as sb:
        outs = forward()
        if mode != "fwd":
            backward(outs)
        del outs
        _sync()
    info = dict(device_info())
    info.update(mode=mode, peak_mem_bytes=int(pm.peak), saved_bytes=int(sb.total))
    info.update(extra)
    benchmark.extra_info.update(info)

    if rounds is None:
        rounds = 20 if on_gpu() else 3
    before = counter.snapshot() if counter is not None else None
    calls[0] = 0
    if mode == "fwd":
        benchmark.pedantic(run_fwd, rounds=rounds, iterations=1, warmup_rounds=0)
    elif mode == "bwd":
        benchmark.pedantic(run_bwd, setup=setup_bwd, rounds=rounds, warmup_rounds=0)
    else:
        benchmark.pedantic(run_full, rounds=rounds, iterations=1, warmup_rounds=0)
    if counter is not None:
        verdict = counter.verdict(before, calls[0])
        benchmark.extra_info["compile"] = verdict
        if not verdict["valid"]:
            raise RuntimeError(f"invalid compile baseline: {verdict['reason']}")


# ----------------------------------------------------------------------------------------------
# compile baselines that prove they ran compiled
# ----------------------------------------------------------------------------------------------
RECOMPILE_LIMIT = 64


def compile_backend() -> str:
    return os.environ.get("ATTNFAST_BENCH_COMPILE_BACKEND", "").strip() or "inductor"


def configure_dynamo():
    """Benchmark processes compile one graph per (shape, dtype) of a function: allow that many, and make
    hitting the limit an error instead of Dynamo's silent fall-back to eager."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    else:  # older name
        cfg.cache_size_limit = max(cfg.cache_size_limit, RECOMPILE_LIMIT)
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


class CompileCounter:
    """A torch.compile backend wrapping ``backend`` that counts the graphs it compiles and every call of
    a compiled graph. A forward that ran compiled adds at least one call (its backward is AOTAutograd's
    compiled backward of that graph)."""

    def __init__(self, backend: str | None = None):
        from torch._dynamo.backends.registry import lookup_backend

        self.backend = backend or compile_backend()
        self._inner = lookup_backend(self.backend)
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        compiled_fn = self._inner(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled_fn(*args)

        return run

    def snapshot(self) -> tuple:
        return self.graphs, self.calls

    def verdict(self, before: tuple, invocations: int) -> dict:
        """Whether the ``invocations`` calls made since ``snapshot()`` each ran compiled graphs and
        compiled nothing new."""
        graphs0, calls0 = before
        ran = self.calls - calls0
        new_graphs = self.graphs - graphs0
        reason = None
        if self.graphs == 0:
            reason = "no graph was ever compiled"
        elif ran < invocations:
            reason = f"{invocations} timed calls ran only {ran} compiled graph calls (eager fall-back)"
        elif new_graphs:
            reason = f"{new_graphs} graph(s) compiled during the timed calls"
        return {"backend": self.backend, "graphs": self.graphs, "graph_calls": ran, "calls": invocations,
                "new_graphs_while_timed": new_graphs, "valid": reason is None, "reason": reason}


class Compiled:
    """``torch.compile(fn, backend=CompileCounter(backend), dynamic=False)``: ``.counter`` says whether it
    ran compiled; ``.original`` is ``fn`` (its ``parameters()`` are the compiled module's)."""

    def __init__(self, fn, backend: str | None = None):
        configure_dynamo()
        self.original = fn
        self.counter = CompileCounter(backend)
        self._compiled = torch.compile(fn, backend=self.counter, dynamic=False)

    def __call__(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)

    def parameters(self):
        return self.original.parameters() if hasattr(self.original, "parameters") else iter(())


_COMPILED = {}


def compiled(fn, backend: str | None = None) -> Compiled:
    """One ``Compiled`` per (function object, backend); the cache holds ``fn`` so its id is never reused."""
    key = (id(fn), backend or compile_backend())
    if key not in _COMPILED:
        _COMPILED[key] = (fn, Compiled(fn, backend))
    return _COMPILED[key][1]


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(device=device(), dtype=dtype)
