"""AOT evidence: compile the kernels' binaries for CUDA targets without a GPU and tabulate them.

Every registered kernel configuration, and the binaries that captured launches run.

    python -m attnfast.kernels.aot [--caps 80 90] [--filter SUBSTR] [--jobs N]
                                   [--json OUT.json] [--markdown OUT.md] [--module FILE.py ...]
                                   [--launches FILE.py ...]

For every configuration (``registry.all_configs()``, plus the ``aot_configs()`` of each ``--module``
file) and compute capability, one ``triton.compile`` of its plain build (every integer argument a
plain ``i32``, no alignment); with ``--launches``, the binaries the launches of each file's
``launches()`` really run (``launches``: Triton's own specialization of their arguments: integers
equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get a divisibility hint)
replace the plain build of the configurations they reach. From each compile's TTGIR, PTX and cubin
(SASS) the table gives registers, spills, shared memory, resident blocks per SM, the MMA instruction
family, MMA instructions per thread against the dots' minimum, and atomics by memory order (see
``asm``). ``--json`` / ``--markdown`` are written atomically and name the Triton and ptxas versions,
the command and the date. Exits non-zero if any configuration fails to compile, spills beyond its
budget (``budgets``), uses more registers than its budget or more shared memory than the target has,
or cannot launch (0 blocks per SM), or if a captured launch matches no registered configuration.
Must run *without* ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import traceback

from . import budgets
from .registry import all_configs, compile_config, ptxas_version

# Shared memory available to one block (opt-in maximum), bytes.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


_CONFIGS = {}


def load_module(path: str, needs: str):
    """Import a Python file outside the package (e.g. test fixtures, launch scenarios) that defines
    ``needs``."""
    name = "_aot_extra_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ValueError(f"{path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # triton.jit looks the module up for globals
    spec.loader.exec_module(mod)
    if not hasattr(mod, needs):
        raise ValueError(f"{path}: defines no {needs}()")
    return mod


def load_module_configs(path: str) -> list:
    """``aot_configs()`` of a Python file outside the package (e.g. test fixtures)."""
    return list(load_module(path, "aot_configs").aot_configs())


def _compile_one(job):
    """Compile one (config name, cap); runs in a worker process (kernels are not picklable)."""
    name, cap = job
    cfg = _CONFIGS[name]
    try:
        return compile_config(cfg, cap)
    except Exception as e:  # report every failure, not just the first
        return {"name": cfg.name, "cap": cap, "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=3)}


def check(r: dict) -> list:
    """What fails the AOT run for one result (compile error, budgets, limits)."""
    where = f"{r['name']} sm_{r['cap']}"
    if "error" in r:
        return [f"{where}: compile error: {r['error'][:300]}"]
    out = []
    if r["spill_bytes"] > r["max_spill_bytes"]:
        out.append(f"{where}: {r['spill_bytes']} spilled bytes > budget {r['max_spill_bytes']}. "
                   + budgets.over_budget_advice(r.get("base") or r["name"], r["cap"]))
    if r["regs"] > r["max_regs"]:
        out.append(f"{where}: {r['regs']} registers > budget {r['max_regs']}")
    limit = MAX_SHARED.get(r["cap"], 99 * 1024)
    if r["shared_bytes"] > limit:
        out.append(f"{where}: {r['shared_bytes']} B shared memory > {limit} B")
    if r["blocks_per_sm"] < 1:
        out.append(f"{where}: cannot launch (0 blocks per SM: {r['regs']} registers x {r['num_warps']} warps, "
                   f"{r['shared_bytes']} B shared)")
    return out


def _fmt_atomics(a: dict) -> str:
    if not a["total"] and not a["fences"]:
        return "-"
    text = f"{a['ordered']}/{a['total']} ordered"
    return text + (f", {a['fences']} fences" if a["fences"] else "")


def markdown(report: dict) -> str:
    """The report as a Markdown page: header, summary, one row per (config, cap), and the launches
    behind each launch binary."""
    head = report["header"]
    ptxas = ", ".join(f"sm_{c}: {v}" for c, v in sorted(head["ptxas"].items()))
    rows = sorted(report["results"], key=lambda r: (r["name"], r["cap"]))
    ok = [r for r in rows if "error" not in r]
    repeats = sorted({r["name"] for r in ok if r["mma"]["max_ratio"] > 1})
    ordered = sorted({r["name"] for r in ok if r["atomics"]["ordered"] or
                      (r["atomics"]["fences"] and r["atomics"]["total"])})
    launched = {r["name"]: r for r in rows if r.get("base")}
    lines = [
        "# AOT evidence: Triton kernel binaries compiled for sm_80 / sm_90 (no GPU)",
        "",
        f"- triton {head['triton']}; ptxas {ptxas}",
        f"- generated {head['date']} by `{head['command']}`",
        f"- {len(rows)} compiles of {len({r['name'] for r in rows})} binaries, {len(report['failures'])} failures",
        f"- {len(launched)} binaries that the captured launches run (`name@hash`, specialized as Triton"
        f" specializes at launch; scenarios: {', '.join(f'`{f}`' for f in head.get('launch_files', [])) or 'none'}),"
        f" {len({r['name'] for r in rows}) - len(launched)} plain builds of registered configurations that no"
        " captured launch reaches (every integer a plain i32, no alignment hints)",
        f"- MMA work repeated by warps (max ratio > 1): {len(repeats)} binaries"
        + (": " + ", ".join(f"`{n}`" for n in repeats) if repeats else ""),
        f"- ordered atomics or fences with atomics: {len(ordered)} binaries"
        + (": " + ", ".join(f"`{n}`" for n in ordered) if ordered else ""),
        "",
        "Columns: registers per thread; spilled bytes (ptxas spill stores + loads) / budget"
        " (`kernels/aot/budgets.py`); shared memory per block (dynamic + static); resident blocks per SM"
        " (`kernels/_launch.py: blocks_per_sm`); MMA family; MMA instructions per thread in the PTX (minimum for"
        " the dots' tiles when warps do not overlap); ratio: max over dot sites of the MMA work per warp / the"
        " minimum (1 = no warp repeats another's rows); atomics: ordered (acquire/release/acq_rel/sc) / all"
        " atom+red, and ordering fences.",
        "",
        "| binary | sm | regs | spill B / budget | smem B | blocks/SM | MMA | MMA instr/thread (min) | ratio | atomics |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['name']}` | {r['cap']} | compile error: {r['error'][:80]} | | | | | | | |")
            continue
        m = r["mma"]
        count = f"{m['count']} ({m['min_count']:g})" if m["count"] else "-"
        ratio = f"{m['max_ratio']:g}" if m["count"] else "-"
        lines.append(f"| `{r['name']}` | {r['cap']} | {r['regs']} | {r['spill_bytes']} / {r['max_spill_bytes']} | "
                     f"{r['shared_bytes']} | {r['blocks_per_sm']} | {m['family']} | {count} | {ratio} | "
                     f"{_fmt_atomics(r['atomics'])} |")
    if launched:
        lines += ["", "## Launch binaries: specialization and the launches that run them", "",
                  "Specialization: integer arguments that became the constant 1; arguments with the"
                  " 16-divisibility hint (integers divisible by 16, 16-byte aligned pointers); those with neither.",
                  ""]
        for name, r in sorted(launched.items()):
            lines.append(f"- `{name}` ({r['spec']}): " + "; ".join(r["launches"]))
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def to_json(report: dict) -> str:
    """The report as JSON with one result per line (small, and diffs show which rows changed)."""
    rows = ",\n".join(json.dumps(r, sort_keys=True) for r in report["results"])
    rest = {k: v for k, v in report.items() if k != "results"}
    return json.dumps(rest, indent=1)[:-2] + ',\n "results": [\n' + rows + "\n ]\n}\n"


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it over ``path``: readers see the old file or the
    new one, never a part. (``attnfast.train.checkpoint.atomic_write`` sits above this package.)"""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                     delete=False) as f:
        tmp = f.name
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            os.unlink(tmp)
            raise
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # the mode open() would give, not mkstemp's 0600
    os.replace(tmp, path)


def _command(argv) -> str:
    fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION")
    return " ".join(([f"TRITON_DEFAULT_FP_FUSION={fusion}"] if fusion is not None else [])
                    + ["python -m attnfast.kernels.aot"] + list(argv if argv is not None else sys.argv[1:]))


def captured_configs(paths: list, registered: list) -> tuple:
    """(launch binaries, failures): the binaries the launches of each file's ``launches()`` run
    (``launches.capture``), matched against the registered configurations."""
    from .launches import capture, launch_configs

    records = []
    for path in paths:
        for label, fn in load_module(path, "launches").launches():
            records += capture(fn, label)
    configs, unmatched = launch_configs(records, registered)
    return configs, [f"launch matches no registered configuration: {u}" for u in unmatched]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnfast.kernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--caps", type=int, nargs="+", default=[80, 90])
    p.add_argument("--filter", default="", help="only binaries whose name contains this")
    p.add_argument("--json", default=None, help="write the full report here (atomically)")
    p.add_argument("--markdown", default=None, help="write the table here (atomically)")
    p.add_argument("--module", action="append", default=[],
                   help="also compile the aot_configs() of this Python file (repeatable)")
    p.add_argument("--launches", action="append", default=[],
                   help="capture the launches of this Python file's launches() (a list of (label, callable)) and "
                        "compile the binaries they run instead of the plain builds they reach (repeatable)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET; AOT compilation needs real JIT kernels", file=sys.stderr)
        return 2
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    import triton

    try:
        configs = all_configs()
        for path in args.module:
            configs += load_module_configs(path)
        names = [c.name for c in configs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate kernel config names: {dup}")
        launched, failures = captured_configs(args.launches, configs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reached = {c.base for c in launched}
    configs = [c for c in configs if c.name not in reached] + launched
    configs = [c for c in configs if args.filter in c.name]
    _CONFIGS.clear()
    _CONFIGS.update({c.name: c for c in configs})
    # the most expensive compiles first, so that no long one starts last
    jobs = sorted(((c.name, cap) for c in configs for cap in args.caps),
                  key=lambda j: -_CONFIGS[j[0]].num_warps)
    if args.jobs > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork")  # workers inherit the loaded configs
        with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=ctx) as pool:
            outcomes = list(pool.map(_compile_one, jobs))
    else:
        outcomes = [_compile_one(j) for j in jobs]
    results = []
    for r in sorted(outcomes, key=lambda r: (r["name"], r["cap"])):
        failures += check(r)
        if "error" in r:
            print(f"ERR sm_{r['cap']} {r['name']}: {r['error'][:200]}")
        else:
            print(f"ok  sm_{r['cap']} regs={r['regs']:3d} spill={r['spill_bytes']:5d}B "
                  f"smem={r['shared_bytes']:6d}B blocks/SM={r['blocks_per_sm']:2d} {r['mma']['family']:>9s} "
                  f"x{r['mma']['max_ratio']:<4g} {r['name']}")
        results.append(r)
    header = {"triton": triton.__version__, "ptxas": {str(c): ptxas_version(c) for c in args.caps},
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": _command(argv), "caps": args.caps, "launch_files": args.launches,
              "budgets": {"measured_tritons": list(budgets.MEASURED_TRITONS)}}
    report = {"header": header, "results": results, "failures": failures}
    if args.json:
        write_atomic(args.json, to_json(report))
    if args.markdown:
        write_atomic(args.markdown, markdown(report))
    print(f"{len(results)} compiled, {len(failures)} failed")
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
