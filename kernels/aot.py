"""Compile every registered kernel configuration for CUDA targets, without a GPU.

    python -m attnfast.kernels.aot [--caps 80 90] [--filter SUBSTR] [--json OUT]

Exits non-zero if any configuration fails to compile, spills beyond its budget, or needs more
shared memory than the target has. Must run *without* ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .registry import all_configs, compile_config

# Shared memory available to one block (opt-in maximum), bytes.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caps", type=int, nargs="+", default=[80, 90])
    p.add_argument("--filter", default="")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET; AOT compilation needs real JIT kernels", file=sys.stderr)
        return 2
    results, failures = [], []
    for cfg in all_configs():
        if args.filter not in cfg.name:
            continue
        for cap in args.caps:
            try:
                r = compile_config(cfg, cap)
            except Exception as e:  # report every failure, not just the first
                r = {"name": cfg.name, "cap": cap, "error": f"{type(e).__name__}: {e}",
                     "trace": traceback.format_exc(limit=3)}
                failures.append(f"{cfg.name} sm_{cap}: compile error: {type(e).__name__}: {str(e)[:300]}")
            else:
                if r["spill_bytes"] > cfg.max_spill_bytes:
                    failures.append(f"{cfg.name} sm_{cap}: {r['spill_bytes']} spilled bytes > budget "
                                    f"{cfg.max_spill_bytes}")
                if r["regs"] > cfg.max_regs:
                    failures.append(f"{cfg.name} sm_{cap}: {r['regs']} registers > budget {cfg.max_regs}")
                if r["shared_bytes"] > MAX_SHARED.get(cap, 99 * 1024):
                    failures.append(f"{cfg.name} sm_{cap}: {r['shared_bytes']} B shared memory > "
                                    f"{MAX_SHARED.get(cap)} B")
            results.append(r)
            if "error" not in r:
                print(f"ok  sm_{cap} regs={r['regs']:3d} spill={r['spill_bytes']:5d}B "
                      f"smem={r['shared_bytes']:6d}B  {cfg.name}")
            else:
                print(f"ERR sm_{cap} {cfg.name}: {r['error'][:200]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "failures": failures}, f, indent=1)
    print(f"{len(results)} compiled, {len(failures)} failed")
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
