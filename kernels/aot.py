"""Compile every registered kernel configuration for CUDA targets, without a GPU.

    python -m attnfast.kernels.aot [--caps 80 90] [--filter SUBSTR] [--json OUT] [--jobs N]

Exits non-zero if any configuration fails to compile, spills beyond its budget, or needs more
shared memory than the target has. Must run *without* ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import traceback

from .registry import all_configs, compile_config

# Shared memory available to one block (opt-in maximum), bytes.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


_CONFIGS = {}


def _compile_one(job):
    """Compile one (config name, cap); runs in a worker process (kernels are not picklable)."""
    name, cap = job
    if not _CONFIGS:
        _CONFIGS.update({c.name: c for c in all_configs()})
    cfg = _CONFIGS[name]
    try:
        return compile_config(cfg, cap)
    except Exception as e:  # report every failure, not just the first
        return {"name": cfg.name, "cap": cap, "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caps", type=int, nargs="+", default=[80, 90])
    p.add_argument("--filter", default="")
    p.add_argument("--json", default=None)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET; AOT compilation needs real JIT kernels", file=sys.stderr)
        return 2
    configs = [c for c in all_configs() if args.filter in c.name]
    _CONFIGS.update({c.name: c for c in configs})
    jobs = [(c.name, cap) for c in configs for cap in args.caps]
    if args.jobs > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            outcomes = list(pool.map(_compile_one, jobs))
    else:
        outcomes = [_compile_one(j) for j in jobs]
    results, failures = [], []
    for r in outcomes:
        cfg, cap = _CONFIGS[r["name"]], r["cap"]
        if "error" in r:
            failures.append(f"{cfg.name} sm_{cap}: compile error: {r['error'][:300]}")
            print(f"ERR sm_{cap} {cfg.name}: {r['error'][:200]}")
        else:
            if r["spill_bytes"] > cfg.max_spill_bytes:
                failures.append(f"{cfg.name} sm_{cap}: {r['spill_bytes']} spilled bytes > budget "
                                f"{cfg.max_spill_bytes}")
            if r["regs"] > cfg.max_regs:
                failures.append(f"{cfg.name} sm_{cap}: {r['regs']} registers > budget {cfg.max_regs}")
            if r["shared_bytes"] > MAX_SHARED.get(cap, 99 * 1024):
                failures.append(f"{cfg.name} sm_{cap}: {r['shared_bytes']} B shared memory > "
                                f"{MAX_SHARED.get(cap)} B")
            print(f"ok  sm_{cap} regs={r['regs']:3d} spill={r['spill_bytes']:5d}B "
                  f"smem={r['shared_bytes']:6d}B  {cfg.name}")
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "failures": failures}, f, indent=1)
    print(f"{len(results)} compiled, {len(failures)} failed")
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
