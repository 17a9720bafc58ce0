"""CPU: the SAGAN attention core of attnfast vs PyTorch SDPA as users call it, one provider per process.

The attention core is forward and backward of ``out = gamma * attention(q, k, v) + x``, given the
projections. It runs at B=8, C=128 (d_qk = 16, d_v = 128), SAGAN scale 1. Each provider gets its
inputs in its own layout:

- ``attnfast``: ``attnfast.ops.self_attention`` on ``(B, d, N)`` conv-layout tensors, with the
  default dispatch (on CPU, the blocked CPU path). The residual epilogue is inside the op.
- ``attnfast_batched``: the same op on its batched chunked path, the CPU path before the blocked
  one (kept for float64). This script selects it by patching
  ``attnfast.ops.self_attention._cpu_path``.
- ``sdpa_default`` / ``sdpa_flash_padded``: ``sdpa_providers.py`` on contiguous
  ``(B, 1, N, d)`` tensors, followed by ``torch.addcmul(x, o, gamma)``. The flash provider's
  q/k padding is part of its time and memory, as it is for a user.

Each provider runs in its own process, so its peak RSS is its own. A process warms up at a tiny
shape, allocates its inputs and the output gradient, resets its peak RSS
(``/proc/self/clear_refs``) and takes RSS as the baseline. "Peak growth" is the peak RSS
(``VmHWM``) above that baseline. ``ru_maxrss`` would be wrong here: Linux carries it across fork
and exec, so a child starts at its parent's peak. "Saved" is what autograd keeps for backward,
counted once per storage with saved_tensors_hooks on one more forward; it includes the inputs the
op keeps. "Allocator peak" (at ``--alloc-peak-sizes``) is the deterministic peak of PyTorch's CPU
allocator over one more step (``harness.AllocatedPeak``).

All providers' processes are alive at once, but only one steps at a time. Round r runs one
forward+backward step of each provider, in an order rotated by r, so every round's steps see the
same machine (a shared machine's speed drifts). "Paired ratio" is the median over rounds of a
provider's step time over sdpa_flash_padded's in the same round. The 1-minute load average is
recorded at every step. Writes ``<out>.json`` and ``<out>.md``.

    python benchmarks/cpu_sdpa_compare.py [--sizes 64 96] [--steps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("attnfast", "attnfast_batched", "sdpa_default", "sdpa_flash_padded")
BASELINE = "sdpa_flash_padded"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that across fork and exec,
    so a child would start at its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_fn(provider: str, b: int, c: int, n: int, scale: float = 1.0):
    """``(fn, leaves, info)``: ``fn()`` is one forward of ``provider`` on leaves (requiring grad) of shape
    B=b, C=c, N=n. ``info`` says which path/backend it runs."""
    import torch

    import sdpa_providers
    from attnfast.reference.self_attention import qk_dim

    d = qk_dim(c)
    gamma = torch.full((1,), 0.5, requires_grad=True)
    if provider in ("attnfast", "attnfast_batched"):
        sa_mod = sys.modules.get("attnfast.ops.self_attention")
        if sa_mod is None:
            import attnfast.ops.self_attention  # noqa: F401  (the package re-exports the function)

            sa_mod = sys.modules["attnfast.ops.self_attention"]
        if provider == "attnfast_batched":
            sa_mod._cpu_path = lambda q: False
        q, k = torch.randn(b, d, n), torch.randn(b, d, n)
        v, x = torch.randn(b, c, n), torch.randn(b, c, n)

        def fn():
            return sa_mod.self_attention(q, k, v, x, gamma, scale)

        path = "blocked CPU path" if sa_mod._cpu_path(q) and provider == "attnfast" else "batched chunked path"
        info = {"path": path, "layout": "(B, d, N)"}
    elif provider in sdpa_providers.PROVIDERS:
        q, k = torch.randn(b, 1, n, d), torch.randn(b, 1, n, d)
        v, x = torch.randn(b, 1, n, c), torch.randn(b, 1, n, c)
        attend = sdpa_providers.attention(provider)
        assert all(t.is_contiguous() for t in (q, k, v)), "the user layout is contiguous (B, heads, N, d)"

        def fn():
            return torch.addcmul(x, attend(q, k, v, scale), gamma)

        info = {"path": "sdpa", "sdpa_backend": sdpa_providers.backend_of(provider, q, k, v, scale),
                "layout": "(B, 1, N, d) contiguous"}
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}; got {provider!r}")
    leaves = [q, k, v, x, gamma]
    for t in leaves:
        t.requires_grad_(True)
    return fn, leaves, info


def make_step(provider: str, b: int, c: int, n: int, scale: float = 1.0):
    """``(step, info)``: ``step()`` runs one forward+backward of ``provider`` (``make_fn``) and clears
    the leaves' grads."""
    import torch

    fn, leaves, info = make_fn(provider, b, c, n, scale)
    grad = torch.randn(fn().shape)

    def step(backward: bool = True):
        out = fn()
        if backward:
            out.backward(grad)
        for t in leaves:
            t.grad = None

    return step, info


def child(provider: str, b: int, c: int, s: int, threads: int, alloc_peak: bool) -> None:
    """One provider's process: set up, then run one timed step per ``step`` line on stdin and answer
    with its time; on ``done``, print the process's peak growth and saved bytes and exit."""
    import gc

    import torch

    sys.path.insert(0, HERE)
    import harness

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    warm, _ = make_step(provider, 2, c, 64)
    warm()
    warm()
    del warm
    step, info = make_step(provider, b, c, s * s)
    gc.collect()
    reset = _reset_peak_rss()
    base = _rss()
    print(json.dumps({"ready": True}), flush=True)
    times, peaks = [], []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append(_peak_rss() - base)
        print(json.dumps({"time_s": times[-1]}), flush=True)
    with harness.SavedBytes() as sb:
        step(backward=False)  # what the forward saves; the graph is dropped unused
    extra = {}
    if alloc_peak:
        with harness.AllocatedPeak() as ap:
            step()
        extra["alloc_peak_bytes"] = ap.peak
    print(json.dumps(dict(info, provider=provider, B=b, C=c, H=s, W=s, N=s * s, threads=torch.get_num_threads(),
                          times_s=times, min_s=min(times), median_s=statistics.median(times),
                          peak_rss_growth_bytes=max(peaks), peak_after_each_step=peaks, peak_reset=reset,
                          saved_bytes=sb.total, **extra)), flush=True)


def _start(provider, b, c, s, threads, alloc_peak):
    env = dict(os.environ)
    for var in ("TRITON_INTERPRET", "ATTNFAST_NAN_FILL", "ATTNFAST_SA_CHUNK_ELEMS"):
        env.pop(var, None)
    env["ATTNFAST_BACKEND"] = "auto"
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", provider, str(b), str(c), str(s), str(threads),
           str(int(alloc_peak))]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _reply(proc) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"exit {proc.wait()}: {proc.stderr.read().strip()[-300:]}")
    return json.loads(line)


def run_size(providers, b, c, s, steps, threads, alloc_peak):
    """All providers' processes at once, idle but one: step rounds A B C D, B C D A, ... so each
    round's steps see the same machine; then each process reports its own peak and saved bytes."""
    procs = {pr: _start(pr, b, c, s, threads, alloc_peak) for pr in providers}
    loads = {pr: [] for pr in providers}
    failed = {}
    try:
        for pr, proc in procs.items():
            try:
                _reply(proc)
            except RuntimeError as e:
                failed[pr] = str(e)
        live = [pr for pr in providers if pr not in failed]
        for r in range(steps):
            for pr in live[r % len(live):] + live[:r % len(live)]:
                if pr in failed:
                    continue
                loads[pr].append(os.getloadavg()[0])
                procs[pr].stdin.write("step\n")
                procs[pr].stdin.flush()
                try:
                    _reply(procs[pr])
                except RuntimeError as e:
                    failed[pr] = str(e)
        results = []
        for pr in providers:
            if pr in failed:
                results.append({"provider": pr, "H": s, "ok": False, "error": failed[pr]})
                continue
            procs[pr].stdin.write("done\n")
            procs[pr].stdin.flush()
            res = dict(_reply(procs[pr]), ok=True, load_1min_at_steps=loads[pr])
            results.append(res)
            print(json.dumps(res), flush=True)
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def summarize(runs, sizes, providers):
    rows = []
    for s in sizes:
        base = None
        for pr in providers:
            ok = [r for r in runs if r["provider"] == pr and r["H"] == s and r.get("ok")]
            if not ok:
                rows.append({"provider": pr, "H": s, "runs": 0})
                continue
            times = [t for r in ok for t in r["times_s"]]
            peaks = [r["peak_rss_growth_bytes"] for r in ok]
            row = {"provider": pr, "H": s, "N": s * s, "runs": len(ok), "steps": len(times),
                   "min_s": min(times), "median_s": statistics.median(times), "max_s": max(times),
                   "peak_growth_median_bytes": statistics.median(peaks), "peak_growth_max_bytes": max(peaks),
                   "alloc_peak_bytes": ok[0].get("alloc_peak_bytes"), "saved_bytes": ok[0]["saved_bytes"], "path": ok[0].get("sdpa_backend", ok[0]["path"])}
            rows.append(row)
            if pr == BASELINE:
                base = row
        for row in rows:
            if row["H"] == s and row.get("runs") and base:
                mine = next(r for r in runs if r["provider"] == row["provider"] and r["H"] == s and r.get("ok"))
                theirs = next(r for r in runs if r["provider"] == BASELINE and r["H"] == s and r.get("ok"))
                row["paired_ratios"] = [a / b for a, b in zip(mine["times_s"], theirs["times_s"])]
                row["paired_ratio_median"] = statistics.median(row["paired_ratios"])
                row["median_vs_flash_padded"] = row["median_s"] / base["median_s"]
                row["min_vs_flash_padded"] = row["min_s"] / base["min_s"]
                row["peak_vs_flash_padded"] = row["peak_growth_median_bytes"] / base["peak_growth_median_bytes"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--sdpa-default-sizes", type=int, nargs="*", default=[64],
                   help="sizes at which sdpa_default runs (on CPU it is the math path, B x N x N matrices)")
    p.add_argument("--steps", type=int, default=3, help="rounds of timed forward+backward steps, one per provider")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each process (0: torch's default)")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=os.path.join(HERE, "results", "self_attention_cpu_sdpa"))
    p.add_argument("--alloc-peak-sizes", type=int, nargs="*", default=[64],
                   help="sizes at which each process runs one more step under the profiler for the allocator peak")
    p.add_argument("--child", nargs=6, metavar=("PROVIDER", "B", "C", "S", "THREADS", "ALLOC_PEAK"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        pr, b, c, s, threads, alloc_peak = args.child
        child(pr, int(b), int(c), int(s), int(threads), alloc_peak == "1")
        return
    sys.path.insert(0, HERE)
    import harness
    from attnfast.train.checkpoint import atomic_write

    info = dict(harness.device_info())
    info["date_time_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    info["command"] = " ".join(["python", "benchmarks/cpu_sdpa_compare.py"] + list(sys.argv[1:] if argv is None else argv))
    info["load_average_at_start"] = os.getloadavg()
    runs = []
    for s in args.sizes:
        provs = [pr for pr in args.providers if pr != "sdpa_default" or s in args.sdpa_default_sizes]
        runs += run_size(provs, args.batch, args.channels, s, args.steps, args.threads, s in args.alloc_peak_sizes)
    info["load_average_at_end"] = os.getloadavg()
    rows = summarize(runs, args.sizes, args.providers)
    res = {"info": info, "note": args.note, "batch": args.batch, "channels": args.channels, "threads": args.threads,
           "summary": rows, "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out + ".json", lambda f: json.dump(res, f, indent=1), mode="w")
    loads = [x for r in runs for x in r.get("load_1min_at_steps", [])] or [0.0]
    threads = args.threads or "torch default"
    lines = [f"# SAGAN attention core on CPU: attnfast vs SDPA ({info['device']})", "",
             f"torch {info['torch']}, triton {info['triton']}, python {info['python']}, {info['date_time_utc']} UTC; "
             f"threads per process: {threads}. 1-minute load average over the runs: min {min(loads):.2f}, "
             f"max {max(loads):.2f}. {args.note}", "",
             f"Command: `{info['command']}`", "",
             f"Forward+backward of `out = gamma * attention(q, k, v) + x`, B={args.batch}, C={args.channels} "
             f"(d_qk={args.channels // 8}, d_v={args.channels}), scale 1. Times: all timed steps of "
             f"{args.steps} rounds, one step per provider per round, providers interleaved (one process each). "
             "Peak RSS growth: the process's peak RSS above its baseline (inputs and output gradient already "
             "allocated). "
             "Allocator peak: PyTorch's CPU allocator over one step, deterministic (- : not measured at that size). "
             "Saved: bytes autograd keeps for backward (inputs included). Ratios are against sdpa_flash_padded.", "",
             "| map | N | provider | path / SDPA backend | min (s) | median (s) | max (s) | paired ratio vs flash-padded "
             "| peak RSS growth (MiB) | peak vs flash-padded | allocator peak (MiB) | saved (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("runs") and r["provider"] == "sdpa_default" and r["H"] not in args.sdpa_default_sizes:
            continue
        if not r.get("runs"):
            err = next((x.get("error") for x in runs if x["provider"] == r["provider"] and x["H"] == r["H"]), "")
            lines.append(f"| {r['H']}x{r['H']} | {r['H'] ** 2} | {r['provider']} | failed: {err} | | | | | | | | |")
            continue
        ratio = (f"{r['paired_ratio_median']:.2f} ({', '.join(f'{x:.2f}' for x in r['paired_ratios'])})"
                 if "paired_ratio_median" in r else "-")
        pratio = f"{r['peak_vs_flash_padded']:.2f}" if "peak_vs_flash_padded" in r else "-"
        alloc = f"{r['alloc_peak_bytes'] / 2**20:.0f}" if r.get("alloc_peak_bytes") is not None else "-"
        lines.append(f"| {r['H']}x{r['H']} | {r['N']} | {r['provider']} | {r['path']} | {r['min_s']:.3f} | "
                     f"{r['median_s']:.3f} | {r['max_s']:.3f} | {ratio} | {r['peak_growth_median_bytes'] / 2**20:.0f} | "
                     f"{pratio} | {alloc} | {r['saved_bytes'] / 2**20:.1f} |")
    atomic_write(args.out + ".md", lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
