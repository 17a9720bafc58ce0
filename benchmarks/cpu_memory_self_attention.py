"""CPU measurements of SAGAN self-attention (run once, by hand): writes
benchmarks/results/self_attention_cpu.{json,md}.

1. The SAGAN layer, forward+backward at N >= 4096 (B=8, C=128), per provider: time (median of
   ``--repeats``) and peak RSS growth (VmHWM above the warmed-up process), each provider in a
   fresh subprocess. Providers: ``eager`` (the reference layer), ``sdpa_default`` and
   ``sdpa_flash_padded`` (SDPA on the conv outputs in the contiguous (B, heads, N, d) layout users
   pass, see ``sdpa_providers.py``), ``chunked`` (``SelfAttention2d`` with
   ``ATTNFAST_BACKEND=torch``: on CPU, the blocked CPU path). ``cpu_sdpa_compare.py`` compares
   the attention core alone.
2. For each provider, the largest square map that trains (one forward+backward step) at B=8,
   C=128 within ``--budget-gib`` of address space above the warmed-up process (RLIMIT_AS, so an
   attempt fails cleanly instead of swapping) and ``--step-limit-s`` seconds; sizes in increasing
   order, stopping at the first failure.

    python benchmarks/cpu_memory_self_attention.py [--budget-gib 8] [--sizes 32 64 96 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, resource, statistics, sys, time
import torch
sys.path.insert(0, HERE)
import sdpa_providers
from attnfast.nn.self_attention import SelfAttention2d
from attnfast.reference.self_attention import SelfAttention

provider, b, c, s, repeats, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
import attnfast.config
attnfast.config.set_backend("torch")
torch.manual_seed(0)
ref = SelfAttention(c)
with torch.no_grad():
    ref.gamma.fill_(0.5)
fused = SelfAttention2d(c, tuple_output=False)
fused.load_state_dict(ref.state_dict())

def sdpa(x):
    # the way users call SDPA: contiguous (B, heads, N, d); see sdpa_providers.py
    bb, cc, h, w = x.shape
    q, k, v = (sdpa_providers.user_layout(conv(x)) for conv in (ref.query_conv, ref.key_conv, ref.value_conv))
    o = sdpa_providers.attention(provider)(q, k, v, 1.0)
    return ref.gamma * o.squeeze(1).transpose(1, 2).reshape(bb, cc, h, w) + x

fn = sdpa if provider in sdpa_providers.PROVIDERS else {"eager": lambda x: ref(x)[0], "chunked": fused}[provider]

def step(x):
    out = fn(x)
    out.backward(torch.ones_like(out))

step(torch.randn(2, c, 8, 8, requires_grad=True))  # warm up libraries and thread pools
def vm_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
if budget > 0:
    lim = vm_bytes() + int(budget * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
def peak_rss():  # VmHWM: ru_maxrss is carried across fork and exec, so it starts at the parent's peak
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = peak_rss()
times = []
try:
    for _ in range(repeats):
        x = torch.randn(b, c, s, s, requires_grad=True)
        t0 = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t0)
        del x
    ok, err = True, None
except (RuntimeError, MemoryError) as e:
    ok, err = False, f"{type(e).__name__}: {str(e)[:160]}"
peak = peak_rss() - base
print(json.dumps({"provider": provider, "B": b, "C": c, "H": s, "W": s, "N": s * s, "ok": ok, "error": err,
                  "times_s": times, "median_s": statistics.median(times) if times else None,
                  "peak_rss_growth_bytes": peak}))
"""


def run_child(provider, b, c, s, repeats, budget, timeout):
    env = dict(os.environ, ATTNFAST_BACKEND="torch")
    env.pop("TRITON_INTERPRET", None)
    try:
        r = subprocess.run([sys.executable, "-c", f"HERE = {HERE!r}\n" + CHILD, provider, str(b), str(c), str(s), str(repeats), str(budget)],
                           capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"provider": provider, "B": b, "C": c, "H": s, "W": s, "N": s * s, "ok": False,
                "error": f"step over the {timeout} s limit"}
    if r.returncode != 0 or not r.stdout.strip():
        return {"provider": provider, "B": b, "C": c, "H": s, "W": s, "N": s * s, "ok": False,
                "error": f"exit {r.returncode}: {r.stderr.strip()[-200:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--compare-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128])
    p.add_argument("--providers", nargs="+", default=["eager", "sdpa_default", "sdpa_flash_padded", "chunked"])
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--step-limit-s", type=int, default=300)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=os.path.join(HERE, "results", "self_attention_cpu"))
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import harness
    from attnfast.train.checkpoint import atomic_write

    b, c = args.batch, args.channels
    info = dict(harness.device_info())
    info["date_time_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    info["load_average_at_start"] = os.getloadavg()
    info["command"] = " ".join(["python", "benchmarks/cpu_memory_self_attention.py"] + list(
        sys.argv[1:] if argv is None else argv))
    compare = [run_child(pr, b, c, s, args.repeats, 0, 3 * args.step_limit_s)
               for s in args.compare_sizes for pr in args.providers]
    largest = {}
    attempts = []
    for pr in args.providers:
        largest[pr] = None
        for s in args.sizes:
            r = run_child(pr, b, c, s, 1, args.budget_gib, args.step_limit_s)
            attempts.append(r)
            print(json.dumps(r), flush=True)
            if not r["ok"]:
                break
            largest[pr] = s
    info["load_average_at_end"] = os.getloadavg()
    res = {"info": info, "note": args.note, "budget_gib": args.budget_gib, "step_limit_s": args.step_limit_s,
           "compare": compare, "largest_map": largest, "attempts": attempts}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write(args.out + ".json", lambda f: json.dump(res, f, indent=1), mode="w")
    lines = [f"# SAGAN self-attention on CPU ({info['device']})", "",
             f"torch {info['torch']}, triton {info['triton']}, python {info['python']}, {info['date_time_utc']} UTC. "
             f"Load average start/end: {info['load_average_at_start']} / {info['load_average_at_end']}. {args.note}", "",
             f"Command: `{info['command']}`", "",
             f"## Forward+backward, B={b}, C={c} (median of {args.repeats})", "",
             "| map | N | provider | time (s) | peak RSS growth (MiB) |", "|---|---|---|---|---|"]
    for r in compare:
        t = f"{r['median_s']:.2f}" if r.get("median_s") else r.get("error")
        mem = f"{r['peak_rss_growth_bytes'] / 2**20:.0f}" if "peak_rss_growth_bytes" in r else "-"
        lines.append(f"| {r['H']}x{r['W']} | {r['N']} | {r['provider']} | {t} | {mem} |")
    lines += ["", f"## Largest map that trains at B={b}, C={c} (budget {args.budget_gib:g} GiB, "
                  f"{args.step_limit_s} s per step; sizes tried: {args.sizes})", "",
              "| provider | largest map | first failure |", "|---|---|---|"]
    for pr in args.providers:
        fail = next((a for a in attempts if a["provider"] == pr and not a["ok"]), None)
        lg = largest[pr]
        first = f"{fail['H']}x{fail['W']}: {fail['error']}" if fail else "none (largest size tried)"
        lines.append(f"| {pr} | {f'{lg}x{lg}' if lg else 'none'} | {first} |")
    atomic_write(args.out + ".md", lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
