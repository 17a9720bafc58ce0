"""CPU paths under load: every fused path against its alternatives, quiet and with busy processes, one run.

A shared CPU (a CI runner, a laptop with a build going) has other runnable processes. A multi-threaded PyTorch
op is one OpenMP parallel region that waits for all its threads, so a path made of many short ops pays one
scheduling delay per op when the cores are busy. This script measures that side by side:

- Load levels: ``--busy`` counts of competing processes (default 0, half, all and twice the cores). A busy
  process is a Python spin loop this script starts before a level and kills after it (``os.killpg`` on its own
  process group: nothing else is touched).
- Cases and providers (fp32, torch's default threads unless ``--threads``):

  ``self_attention``  the SAGAN attention core, forward+backward of ``gamma * attention(q, k, v) + x``
                      (B=8, C=128, 64x64; ``cpu_sdpa_compare.make_step``): ``attnfast`` (the op's CPU path),
                      ``sdpa_flash_padded``, ``sdpa_default`` (the math path on CPU), ``eager`` (the seed's
                      ``softmax(q^T k)`` then ``v p^T``, autograd).
  ``self_attention_layer``  ``attnfast.nn.SelfAttention2d`` vs the seed's layer (``attnfast.reference``).
  ``grid_attention``  AttnVGG's pool-3 block at 512x512 input (l: B x 256 x 64 x 64, g: B x 512 x 16 x 16).
  ``cbam``            CBAM at ResNet-50's stage 2 (B x 512 x 28 x 28), BatchNorm in train mode.
  ``residual_gate``   ``(1 + sigmoid(m)) * t`` on B x 256 x 56 x 56.
  ``main_job``        ``attnfast train --attention fused`` vs ``reference`` (the README's main job; the
                      number of epochs is ``--main-job-epochs``), timed as one step.

- Every measurement is a fresh process. Within a level, the providers of a case run one after the other, in an
  order rotated every round (``--rounds``) and load level. A process warms up at a tiny shape, runs one untimed
  step at the real shape, then ``--steps`` timed steps: wall time and process CPU time (all its threads: a
  thread spinning at a barrier shows here). Peak RSS growth is the process's peak RSS during the timed steps
  (VmHWM, reset after the untimed step) above its RSS after that step; "saved" is what autograd keeps for backward
  (``harness.SavedBytes``) where the case has one. The 1-minute load average is recorded before and after every
  measurement (it lags the real load by about a minute and counts the measured process too).

"Ratio" is a provider's median step time over the best alternative's (the fastest other provider) at the
same level: below 1 the fused path wins. Writes ``<out>.json`` and ``<out>.md``.

    python benchmarks/cpu_load.py                       # full run (about 25 min on 2 cores: 11 without main_job)
    python benchmarks/cpu_load.py --quick               # tiny shapes, 2 levels: a dry run (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FUSED = {"self_attention": "attnfast", "self_attention_layer": "fused", "grid_attention": "fused",
         "cbam": "fused", "residual_gate": "fused", "main_job": "fused"}
PROVIDERS = {"self_attention": ("attnfast", "sdpa_flash_padded", "sdpa_default", "eager"),
             "self_attention_layer": ("fused", "eager"), "grid_attention": ("fused", "eager"),
             "cbam": ("fused", "eager"), "residual_gate": ("fused", "eager"), "main_job": ("fused", "reference")}
CASES = tuple(PROVIDERS)
# (full, quick) sizes per case
SIZES = {"self_attention": ({"B": 8, "C": 128, "H": 64}, {"B": 2, "C": 16, "H": 8}),
         "self_attention_layer": ({"B": 8, "C": 128, "H": 64}, {"B": 2, "C": 16, "H": 8}),
         "grid_attention": ({"B": 8, "C": 256, "H": 64, "CG": 512, "A": 256, "UP": 4},
                            {"B": 2, "C": 8, "H": 8, "CG": 16, "A": 8, "UP": 4}),
         "cbam": ({"B": 8, "C": 512, "H": 28}, {"B": 2, "C": 32, "H": 8}),
         "residual_gate": ({"B": 8, "C": 256, "H": 56}, {"B": 2, "C": 8, "H": 8}),
         "main_job": ({"epochs": 1}, {"epochs": 1, "synthetic_n": 40, "synthetic_size": 32, "image_size": 32,
                                     "batch_size": 8})}
# environment a child must not inherit (test-only settings of attnfast)
DROP_ENV = ("TRITON_INTERPRET", "ATTNFAST_NAN_FILL", "ATTNFAST_SA_CHUNK_ELEMS", "ATTNFAST_BACKEND")


# ----------------------------------------------------------------------------------------------- child side

def _eager_attention_step(b, c, n):
    """The seed's attention core in plain autograd: ``gamma * v softmax(q^T k)^T + x``."""
    import torch

    from attnfast.reference.self_attention import qk_dim

    d = qk_dim(c)
    q, k, v, x = (torch.randn(b, d, n), torch.randn(b, d, n), torch.randn(b, c, n), torch.randn(b, c, n))
    gamma = torch.full((1,), 0.5)
    leaves = [q, k, v, x, gamma]
    for t in leaves:
        t.requires_grad_(True)

    def fn():
        p = torch.softmax(torch.bmm(q.transpose(1, 2), k), -1)
        return gamma * torch.bmm(v, p.transpose(1, 2)) + x
    return fn, leaves


def _module_step(module, inputs):
    leaves = list(inputs) + [p for p in module.parameters()]

    def fn():
        out = module(*inputs)
        return out[0] if isinstance(out, tuple) else out
    return fn, leaves


def make_case(case: str, provider: str, size: dict):
    """``fn, leaves``: ``fn()`` is one forward; its backward takes a fixed random gradient."""
    import torch

    torch.manual_seed(0)
    b, c, h = size.get("B"), size.get("C"), size.get("H")
    if case == "self_attention":
        if provider == "eager":
            return _eager_attention_step(b, c, h * h)
        import cpu_sdpa_compare

        fn, leaves, _ = cpu_sdpa_compare.make_fn(provider, b, c, h * h)
        return fn, leaves
    if case == "self_attention_layer":
        import providers

        ref, fused = providers.sagan_modules(c, torch.float32, "cpu")
        return _module_step(fused if provider == "fused" else ref, [torch.randn(b, c, h, h, requires_grad=True)])
    if case == "grid_attention":
        import providers

        ref, fused = providers._grid_modules(c, size["CG"], size["A"], size["UP"], True, torch.float32, "cpu")
        inputs = providers.grid_inputs(b, c, h, size["CG"], size["UP"], torch.float32, "cpu")
        return _module_step(fused if provider == "fused" else ref, inputs)
    if case == "cbam":
        import providers

        ref, fused = providers._cbam_modules(c, torch.float32, "cpu", False)
        return _module_step(fused if provider == "fused" else ref, [torch.randn(b, c, h, h, requires_grad=True)])
    if case == "residual_gate":
        from attnfast.ops import residual_gate
        from attnfast.reference import residual_gate_reference

        gate = residual_gate if provider == "fused" else residual_gate_reference
        m, t = torch.randn(b, c, h, h, requires_grad=True), torch.randn(b, c, h, h, requires_grad=True)
        return (lambda: gate(m, t)), [m, t]
    raise ValueError(f"case must be one of {CASES}; got {case!r}")


def child(case: str, provider: str, size: dict, steps: int) -> dict:
    import gc

    import torch

    sys.path.insert(0, HERE)
    import cpu_sdpa_compare as cc
    import harness

    small = {k: (2 if k == "B" else min(v, 8) if k == "H" else v) for k, v in size.items()}
    fn, leaves = make_case(case, provider, small)  # warm-up at a tiny size: libraries, thread pools
    fn().sum().backward()
    fn, leaves = make_case(case, provider, size)
    grad = torch.randn(fn().shape)

    def step():
        fn().backward(grad)
        for t in leaves:
            t.grad = None
    step()  # untimed: first-touch page faults
    gc.collect()
    reset = cc._reset_peak_rss()
    base = cc._rss()
    walls, cpus = [], []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak = cc._peak_rss() - base
    with harness.SavedBytes() as sb:
        fn()
    return {"wall_s": walls, "cpu_s": cpus, "peak_rss_growth_bytes": peak, "peak_reset": reset,
            "saved_bytes": sb.total, "threads": torch.get_num_threads()}


def main_job_child(provider: str, size: dict) -> dict:
    """``attnfast train --attention PROVIDER`` in a fresh folder (the CI guard's way): one timed step."""
    import resource

    sys.path.insert(0, os.path.join(ROOT, "ci"))
    import main_job

    argv = ["attnfast", "train", "--attention", provider, "--no-progress"]
    for key, val in size.items():
        argv += ["--" + key.replace("_", "-"), str(val)]
    with tempfile.TemporaryDirectory(prefix="attnfast-cpu-load-") as work:
        env = {k: v for k, v in os.environ.items() if k not in main_job.TEST_ONLY_ENV}
        env["ATTNFAST_CACHE"] = os.path.join(work, "cache")
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        script = main_job.resolve(argv)
        with open(os.devnull, "w") as null:
            code, wall, output = main_job.run(script, work, env, 3600.0, echo=null)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if code != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited with {code}: {output.strip()[-300:]}")
        auc, n_val = main_job.check_run(work, output, 0.0)  # the run really trained and validated
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {"wall_s": [wall], "cpu_s": [cpu], "peak_rss_growth_bytes": None, "saved_bytes": None, "argv": argv,
            "script": script[0], "val_auc": auc, "val_count": n_val}


# ----------------------------------------------------------------------------------------------- parent side

# A spin loop that also ends by itself once its parent is gone (a SIGKILL or SIGTERM to this script skips
# its ``finally``; the spinners, in their own sessions, would otherwise spin on as children of init).
SPIN = ("import os\nparent = os.getppid()\nwhile True:\n    for _ in range(200000):\n        pass\n"
        "    if os.getppid() != parent:\n        break\n")


def start_busy(n: int) -> list:
    """``n`` Python spin loops, each in its own process group (so only they are ever killed); each ends
    when this process dies. A failure part way stops the ones already started."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", SPIN], start_new_session=True,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
    except BaseException:
        stop_busy(procs)
        raise
    return procs


def stop_busy(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)  # torch's default: one thread per core
    return env


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant (found before the kill, in any session)."""
    try:
        import psutil
        kids = psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        kids = []
    for target in [pid] + [k.pid for k in kids]:
        for kill in (lambda t: os.killpg(t, signal.SIGKILL), lambda t: os.kill(t, signal.SIGKILL)):
            try:
                kill(target)
            except (ProcessLookupError, PermissionError, OSError):
                pass


def measure(case: str, provider: str, size: dict, steps: int, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, provider, json.dumps(size), str(steps)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    # the child runs in its own session; a timeout (or an exception here) kills it and every process below it,
    # including the main-job case's training process, which ci/main_job.py starts in a session of its own
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(threads),
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(child.pid)
        child.communicate()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "load_before": load0}
    except BaseException:
        _kill_tree(child.pid)
        raise
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    res = {"load_before": load0, "load_after": os.getloadavg()[0], "process_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(res, ok=False, error=f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return dict(res, ok=True, **json.loads(lines[-1]))


def summarize(runs: list) -> list:
    """One row per (busy, case, provider): medians over all timed steps, ratio vs the best alternative."""
    rows = []
    keys = sorted({(r["busy"], r["case"]) for r in runs}, key=lambda k: (CASES.index(k[1]), k[0]))
    for busy, case in keys:
        mine = []
        for pr in PROVIDERS[case]:
            mine_runs = [r for r in runs if (r["busy"], r["case"], r["provider"]) == (busy, case, pr)]
            ok = [r for r in mine_runs if r["ok"]]
            failed = [r.get("error", "failed") for r in mine_runs if not r["ok"]]
            if not ok:
                err = next((r["error"] for r in runs if (r["busy"], r["case"], r["provider"]) == (busy, case, pr)),
                           "not run")
                mine.append({"busy": busy, "case": case, "provider": pr, "ok": False, "error": err})
                continue
            walls = [t for r in ok for t in r["wall_s"]]
            cpus = [t for r in ok for t in r["cpu_s"]]
            loads = [x for r in ok for x in (r["load_before"], r["load_after"])]
            peaks = [r["peak_rss_growth_bytes"] for r in ok if r.get("peak_rss_growth_bytes") is not None]
            mine.append({"busy": busy, "case": case, "provider": pr, "ok": True, "steps": len(walls),
                         "median_s": statistics.median(walls), "min_s": min(walls),
                         "cpu_median_s": statistics.median(cpus), "load_min": min(loads), "load_max": max(loads),
                         "peak_rss_growth_bytes": max(peaks) if peaks else None,
                         "saved_bytes": ok[0].get("saved_bytes"), "threads": ok[0].get("threads"),
                         "runs": len(mine_runs), "failed_runs": failed})
        for row in mine:
            others = [o["median_s"] for o in mine if o["ok"] and o["provider"] != row["provider"]]
            if row["ok"] and others:
                row["ratio_vs_best_other"] = row["median_s"] / min(others)
        rows += mine
    return rows


def _cell(text) -> str:
    """A message as one markdown table cell: one line, no column bars, at most 160 characters."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= 160 else text[:157] + "..."


def _mib(x):
    return "-" if x is None else f"{x / 2 ** 20:.0f}"


def markdown(res: dict) -> str:
    info, rows = res["info"], res["summary"]
    busy_levels = res["busy_levels"]
    lines = [f"# CPU paths under load ({info['device']})", "",
             f"torch {info['torch']}, triton {info['triton']}, python {info['python']}, {info['date_time_utc']} UTC; "
             f"{info['cpu_count']} cores; threads per process: {res['threads'] or 'torch default'}; "
             f"steps {res['steps']} x rounds {res['rounds']} per provider and level. "
             f"1-minute load average at the start {info['load_average_at_start'][0]:.2f}, at the end "
             f"{info['load_average_at_end'][0]:.2f}. attnfast commit {info.get('commit', 'not recorded')}; "
             f"threading environment: {info.get('threading_env') or 'none set'}. {res['note']}", "",
             f"Command: `{info['command']}`", "",
             "Busy: competing spin-loop processes this run started. Load: the 1-minute load average before/after "
             "the measurements of that row (it includes anything else running on the machine, the measured "
             "process too, and lags the real load by about a minute). Time: median "
             "wall seconds per forward+backward step (the main job: the whole run); CPU: process CPU seconds "
             "per step, all threads. Ratio: median time over the fastest other provider's at the same level "
             "(< 1: this provider is the fastest). Peak: peak RSS during the timed steps above the RSS after one "
             "untimed step (MiB); "
             "saved: bytes autograd keeps for backward (MiB).", ""]
    for case in CASES:
        crow = [r for r in rows if r["case"] == case]
        if not crow:
            continue
        lines += [f"## {case} ({', '.join(f'{k}={v}' for k, v in res['sizes'][case].items())})", "",
                  "| busy | load | provider | time (s) | min (s) | CPU (s) | ratio vs best other | peak (MiB) "
                  "| saved (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
        for busy in busy_levels:
            for r in (r for r in crow if r["busy"] == busy):
                if not r["ok"]:
                    lines.append(f"| {busy} | | {r['provider']} | failed: {_cell(r['error'])} | | | | | |")
                    continue
                ratio = f"{r['ratio_vs_best_other']:.2f}" if "ratio_vs_best_other" in r else "-"
                prov = r["provider"]
                if r.get("failed_runs"):  # the medians are over the runs that finished: say how many did not
                    prov += f" ({len(r['failed_runs'])} of {r['runs']} runs failed: {_cell(r['failed_runs'][0])})"
                lines.append(f"| {busy} | {r['load_min']:.1f}-{r['load_max']:.1f} | {prov} | "
                             f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['cpu_median_s']:.2f} | {ratio} | "
                             f"{_mib(r['peak_rss_growth_bytes'])} | {_mib(r['saved_bytes'])} |")
        lines.append("")
    return "\n".join(lines)


def run(args) -> dict:
    sys.path.insert(0, HERE)
    import harness

    ncpu = os.cpu_count() or 1
    busy_levels = args.busy if args.busy is not None else (
        [0, ncpu] if args.quick else sorted({0, max(1, ncpu // 2), ncpu, 2 * ncpu}))
    sizes = {c: SIZES[c][1 if args.quick else 0] for c in args.cases}
    if "main_job" in sizes and not args.quick:
        sizes["main_job"] = dict(sizes["main_job"], epochs=args.main_job_epochs)
    info = dict(harness.device_info())
    info["threading_env"] = harness.threading_env(_env(args.threads))  # what the children get
    info["cpu_count"] = ncpu
    info["date_time_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    info["command"] = " ".join(["python", "benchmarks/cpu_load.py"] + list(args.argv))
    info["load_average_at_start"] = os.getloadavg()
    runs = []
    for level, busy in enumerate(busy_levels):
        procs = start_busy(busy)
        try:
            time.sleep(args.settle_s if busy else 0)
            for case in args.cases:
                provs = list(PROVIDERS[case])
                for rnd in range(args.rounds):
                    first = (rnd + level) % len(provs)  # rotated every round and level: no provider always first
                    for pr in provs[first:] + provs[:first]:
                        r = measure(case, pr, sizes[case], args.steps, args.threads, args.timeout_s)
                        r.update(busy=busy, case=case, provider=pr, round=rnd)
                        runs.append(r)
                        print(json.dumps({k: r.get(k) for k in ("busy", "case", "provider", "ok", "wall_s", "cpu_s",
                                                                 "load_before", "error") if k in r}), flush=True)
        finally:
            stop_busy(procs)
    info["load_average_at_end"] = os.getloadavg()
    return {"info": info, "note": args.note, "busy_levels": busy_levels, "threads": args.threads,
            "steps": args.steps, "rounds": args.rounds, "sizes": sizes, "summary": summarize(runs), "runs": runs}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--busy", type=int, nargs="+", default=None,
                   help="busy-process counts, one level each (default: 0, half, all and twice the cores)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=1, help="processes per provider and level (order rotated)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--main-job-epochs", type=int, default=1, help="epochs of the main-job case (README's: 4)")
    p.add_argument("--settle-s", type=float, default=2.0, help="seconds the busy processes run before a level")
    p.add_argument("--timeout-s", type=float, default=900.0, help="limit per process")
    p.add_argument("--quick", action="store_true", help="tiny shapes, levels 0 and all cores: a dry run")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_load"))
    p.add_argument("--child", nargs=4, metavar=("CASE", "PROVIDER", "SIZE", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        case, pr, size, steps = args.child
        sys.path.insert(0, HERE)
        res = main_job_child(pr, json.loads(size)) if case == "main_job" else \
            child(case, pr, json.loads(size), int(steps))
        print(json.dumps(res), flush=True)
        return
    if any(n < 0 for n in args.busy or []) or args.steps < 1 or args.rounds < 1:
        p.error("--busy counts must be >= 0, --steps and --rounds >= 1")
    args.argv = argv
    res = run(args)
    from attnfast.train.checkpoint import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out + ".json", lambda f: json.dump(res, f, indent=1), mode="w")
    md = markdown(res)
    atomic_write(args.out + ".md", lambda f: f.write(md + "\n"), mode="w")
    print(md)


if __name__ == "__main__":
    main()
