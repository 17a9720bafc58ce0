"""CPU measurements of CBAM (run by hand): writes benchmarks/results/cbam_cpu.{json,md}.

1. Time: eager reference (``attnfast.reference.CBAM``) vs fused (``attnfast.CBAM``, the PyTorch path on CPU) at
   the ResNet-50 stage shapes, fp32, BatchNorm in train mode, forward and forward+backward. Each measurement is
   a fresh process (honest peak RSS), providers alternate ``--rounds`` times (eager first in even rounds, fused
   first in odd ones); every process warms up at a tiny size, runs one untimed step at the real shape and times
   ``--repeats`` more (wall and process CPU time). The table gives the medians over all timed steps and the
   sampled RSS growth during the first real-shape step (x and the upstream gradient excluded).
2. Saved for backward (``harness.SavedBytes``; backend-independent: the op's setup_context decides it):
   eager vs fused at the stage shapes with B=32 and 64, fp32 and bf16, with and without the input x.

    python benchmarks/cpu_cbam.py [--batch 8] [--rounds 3] [--repeats 3] [--note "..."]
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
STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
MIB = 1024 * 1024

CHILD = r"""
import json, sys, time
import torch
from attnfast.nn.cbam import CBAM
from attnfast.reference.cbam import CBAM as RefCBAM
import harness

provider, mode, b, c, s, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
ref = RefCBAM(c)
block = ref
if provider == "fused":
    block = CBAM(c)
    block.load_state_dict(ref.state_dict())
block.train()
x = torch.randn(b, c, s, s, requires_grad=True)
g = torch.randn(b, c, s, s)


def step(x):
    y = block(x)
    if mode == "fwd+bwd":
        y.backward(g if y.shape == g.shape else torch.ones_like(y))
        for p in block.parameters():
            p.grad = None
    return y

step(torch.randn(2, c, 4, 4, requires_grad=True))  # warm-up at a tiny size: libraries, thread pools
with harness.PeakMemory(cuda=False) as pm:  # sampled RSS growth during the first real step
    step(x)  # not timed (first-touch page faults)
    x.grad = None
times, cpu = [], []
for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    y = step(x)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    x.grad = None
    del y
print(json.dumps({"times_s": times, "cpu_s": cpu, "peak_rss_growth_bytes": int(pm.peak)}))
"""


def run_child(provider, mode, b, c, s, repeats, threads):
    env = dict(os.environ, ATTNFAST_BACKEND="auto", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", CHILD, provider, mode, str(b), str(c), str(s), str(repeats),
                        str(threads)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{provider} {mode} {b}x{c}x{s}x{s}: exit {r.returncode}: {r.stderr[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def saved_bytes(harness, b, c, s, dtype):
    """{provider: (saved bytes incl. x, saved bytes beyond x)}; weights are never counted."""
    import torch

    from attnfast.nn.cbam import CBAM
    from attnfast.reference.cbam import CBAM as RefCBAM

    out = {}
    for provider in ("eager", "fused"):
        torch.manual_seed(0)
        block = (RefCBAM if provider == "eager" else CBAM)(c).to(dtype).train()
        x = torch.randn(b, c, s, s, dtype=dtype, requires_grad=True)
        weights = list(block.parameters())
        res = []
        for exclude in (weights, weights + [x]):
            with harness.SavedBytes() as sb:
                sb._seen.update((t.untyped_storage().data_ptr(), t.device) for t in exclude)
                y = block(x)
            del y
            res.append(sb.total)
        out[provider] = tuple(res)
        del x, block
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--saved-batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cbam_cpu"))
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import harness
    import torch

    from attnfast.train.checkpoint import atomic_write

    info = dict(harness.device_info())
    info["date_time_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    info["load_average_at_start"] = os.getloadavg()
    info["command"] = " ".join(["python", "benchmarks/cpu_cbam.py"] + list(sys.argv[1:] if argv is None else argv))
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass

    timing = []
    for c, s in STAGES:
        for mode in ("fwd", "fwd+bwd"):
            runs = {"eager": [], "fused": []}
            for rnd in range(args.rounds):
                order = ("eager", "fused") if rnd % 2 == 0 else ("fused", "eager")  # neither always first
                for provider in order:
                    runs[provider].append(run_child(provider, mode, args.batch, c, s, args.repeats, args.threads))
            row = {"shape": [args.batch, c, s, s], "mode": mode}
            for provider, rs in runs.items():
                times = [t for r in rs for t in r["times_s"]]
                cpu = [t for r in rs for t in r["cpu_s"]]
                row[provider] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                                 "cpu_median_s": statistics.median(cpu), "cpu_s": cpu,
                                 "peak_rss_growth_bytes": int(statistics.median(r["peak_rss_growth_bytes"] for r in rs)),
                                 "times_s": times}
            row["fused_speedup"] = row["eager"]["median_s"] / row["fused"]["median_s"]
            print(json.dumps({k: v for k, v in row.items() if k not in ("eager", "fused")}), flush=True)
            timing.append(row)
    info["load_average_after_timing"] = os.getloadavg()

    saved = []
    for dtype in (torch.float32, torch.bfloat16):
        for b in args.saved_batches:
            for c, s in STAGES:
                r = saved_bytes(harness, b, c, s, dtype)
                saved.append({"shape": [b, c, s, s], "dtype": str(dtype), "eager_bytes": r["eager"][0],
                              "fused_bytes": r["fused"][0], "eager_beyond_x_bytes": r["eager"][1],
                              "fused_beyond_x_bytes": r["fused"][1]})
                print(json.dumps(saved[-1]), flush=True)

    res = {"info": info, "note": args.note, "rounds": args.rounds, "repeats": args.repeats, "timing": timing,
           "saved": saved}
    atomic_write(args.out + ".json", lambda f: json.dump(res, f, indent=1), mode="w")
    lines = [f"# CBAM on CPU ({info['device']})", "",
             f"torch {info['torch']}, triton {info['triton']}, timm {info.get('timm', '-')}, python {info['python']}, "
             f"{info['date_time_utc']} UTC. Load average at start / after timing: {info['load_average_at_start']} / "
             f"{info['load_average_after_timing']}. attnfast commit {info.get('commit', 'not recorded')}; threading "
             f"environment: {info.get('threading_env') or 'none set'}. {args.note}", "",
             f"Command: `{info['command']}`", "",
             f"## Time, B={args.batch}, fp32, BatchNorm in train mode, "
             f"{args.threads or 'default'} torch thread(s) per process", "",
             f"Median over {args.rounds} fresh processes per provider (alternating) x {args.repeats} timed steps "
             "each (after a warm-up at a tiny size and one untimed real step); min-max in brackets. Peak MiB: "
             "RSS growth (sampled) during the first real step over the process before it (x and the upstream "
             "gradient were allocated before), median over the processes. CPU s: process CPU time per step, median.",
             "",
             "| shape | mode | eager s | fused s | fused speedup | eager CPU s | fused CPU s | eager peak MiB | "
             "fused peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in timing:
        e, f = r["eager"], r["fused"]
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['mode']} | {e['median_s']:.3f} "
                     f"[{e['min_s']:.3f}-{e['max_s']:.3f}] | {f['median_s']:.3f} [{f['min_s']:.3f}-{f['max_s']:.3f}] | "
                     f"{r['fused_speedup']:.2f}x | {e['cpu_median_s']:.3f} | {f['cpu_median_s']:.3f} | "
                     f"{e['peak_rss_growth_bytes'] / MIB:.0f} | "
                     f"{f['peak_rss_growth_bytes'] / MIB:.0f} |")
    lines += ["", "## Saved for backward (bytes autograd keeps between forward and backward; weights excluded)", "",
              "Backend-independent: what the op saves is decided by its setup_context, the same on the Triton "
              "(GPU) path. 'with x' counts the block's input (eager and fused both keep it); 'beyond x' is what "
              "the block adds.", "",
              "| shape | dtype | eager MiB (with x) | fused MiB (with x) | ratio | eager MiB beyond x | "
              "fused MiB beyond x | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in saved:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype'].replace('torch.', '')} | "
                     f"{r['eager_bytes'] / MIB:.1f} | {r['fused_bytes'] / MIB:.1f} | "
                     f"{r['fused_bytes'] / r['eager_bytes']:.3f} | {r['eager_beyond_x_bytes'] / MIB:.1f} | "
                     f"{r['fused_beyond_x_bytes'] / MIB:.2f} | "
                     f"{r['fused_beyond_x_bytes'] / r['eager_beyond_x_bytes']:.4f} |")
    atomic_write(args.out + ".md", lambda f: f.write("\n".join(lines) + "\n"), mode="w")


if __name__ == "__main__":
    main()
