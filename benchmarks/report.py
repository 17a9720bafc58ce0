"""Turn pytest-benchmark JSON files into markdown tables and a plot.

    python benchmarks/report.py [RESULT.json ...] [--out-dir benchmarks/results]

For each JSON (default: every ``benchmarks/results/*.json``) it writes ``<stem>.md`` and ``<stem>.png``
beside it: median time per provider and mode, speedups of ``fused`` over ``eager`` and ``compile``,
peak memory and bytes saved for backward, and, where the suite recorded ``bytes``/``flops`` and the
device is a known GPU, the fused forward's share of the roofline. The header names the device,
versions and date stored in the results themselves.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys

from attnfast.train.checkpoint import atomic_write

# Vendor peak figures (dense): HBM bytes/s, FLOP/s by dtype (tensor cores for 16-bit, tf32 for fp32 matmul),
# and the special-function (exp) unit: 3.9e12 exp/s on H100 SXM5 (FlashAttention-3 paper); the H200 is the
# same GH100 chip at the same clocks.
PEAKS = {
    "H100": {"bw": 3.35e12, "torch.bfloat16": 989e12, "torch.float16": 989e12, "torch.float32": 494e12,
             "exp": 3.9e12},
    "H200": {"bw": 4.8e12, "torch.bfloat16": 989e12, "torch.float16": 989e12, "torch.float32": 494e12,
             "exp": 3.9e12},
}
MIB = 1024 * 1024


def _peaks(device: str):
    for key, val in PEAKS.items():
        if key in device:
            return key, val
    return None, None


def _fmt_ms(s):
    return "—" if s is None else f"{s * 1e3:.3f}"


def _fmt_mib(b):
    return "—" if b is None else f"{b / MIB:.1f}"


def load(path: str):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if "provider" not in e or "mode" not in e:
            continue
        if (e.get("compile") or {}).get("valid") is False:  # its timed calls did not all run compiled graphs
            continue
        rows.append({**e, "median": b["stats"]["median"], "name": b["name"]})
    return data, rows


def build_markdown(path: str, data: dict, rows: list) -> str:
    if not rows:
        return f"# {os.path.basename(path)}\n\nNo attnfast benchmark rows.\n"
    e0 = rows[0]
    lines = [f"# Benchmark: {os.path.splitext(os.path.basename(path))[0]}", "",
             f"- device: {e0.get('device')}",
             f"- torch {e0.get('torch')}, triton {e0.get('triton')}, python {e0.get('python')}",
             f"- date: {e0.get('date')} (pytest-benchmark run {data.get('datetime', '?')})",
             f"- source: `{os.path.basename(path)}`; times are medians; memory is peak growth during one run "
             "(CUDA allocator on GPU, sampled RSS on CPU); 'saved' = bytes autograd keeps for backward."]
    backends = sorted({r["compile"]["backend"] for r in rows if r.get("compile")})
    if backends:
        lines.append(f"- compile: torch.compile(dynamic=False), backend {', '.join(backends)}; every timed call ran "
                     "compiled graphs and none compiled while timed (harness.CompileCounter; other rows are dropped)")
    lines.append("")
    providers = []
    for r in rows:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    by_case = collections.OrderedDict()
    for r in rows:
        by_case.setdefault((r.get("op", "?"), r.get("shape", "?"), r.get("dtype", "?"), r["mode"]), {})[r["provider"]] = r
    head = ["op", "shape", "dtype", "mode"] + [f"{p} ms" for p in providers]
    if "fused" in providers:
        head += [f"fused vs {p}" for p in providers if p != "fused"]
    head += [f"{p} peak MiB" for p in providers] + [f"{p} saved MiB" for p in providers]
    has_batch = any(r.get("max_batch") is not None for r in rows)
    if has_batch:
        head += [f"{p} max batch" for p in providers]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    roof = []
    for (op, shape, dtype, mode), prov in by_case.items():
        cells = [op, shape, dtype.replace("torch.", ""), mode]
        cells += [_fmt_ms(prov[p]["median"]) if p in prov else "—" for p in providers]
        if "fused" in providers:
            f = prov.get("fused")
            for p in providers:
                if p == "fused":
                    continue
                cells.append(f"{prov[p]['median'] / f['median']:.2f}×" if f and p in prov else "—")
        cells += [_fmt_mib(prov[p].get("peak_mem_bytes")) if p in prov else "—" for p in providers]
        cells += [_fmt_mib(prov[p].get("saved_bytes")) if p in prov else "—" for p in providers]
        if has_batch:
            cells += [str(prov[p].get("max_batch", "—")) if p in prov else "—" for p in providers]
        lines.append("| " + " | ".join(cells) + " |")
        f = prov.get("fused")
        if f and mode == "fwd" and f.get("bytes"):
            gpu, peaks = _peaks(str(f.get("device", "")))
            if peaks:
                t = f["median"]
                bw_share = f["bytes"] / t / peaks["bw"]
                fl_share = f.get("flops", 0) / t / peaks.get(dtype, peaks["torch.float32"])
                bound = "memory" if bw_share >= fl_share else "compute"
                roof.append(f"| {op} | {shape} | {dtype.replace('torch.', '')} | {f['bytes'] / 1e6:.1f} MB | "
                            f"{f.get('flops', 0) / 1e9:.2f} GFLOP | {bw_share * 100:.0f}% | {fl_share * 100:.0f}% | "
                            f"{bound} |")
    pairs_rows = []
    for (op, shape, dtype, mode), prov in by_case.items():
        for p in providers:
            r = prov.get(p)
            if not r or not r.get("pairs"):
                continue
            _, peaks = _peaks(str(r.get("device", "")))
            rate = r["pairs"] / r["median"]
            share = (f"{r['exps'] / r['median'] / peaks['exp'] * 100:.0f}%"
                     if peaks and r.get("exps") else "—")
            pairs_rows.append(f"| {op} | {shape} | {dtype.replace('torch.', '')} | {mode} | {p} | "
                              f"{rate / 1e9:.1f} | {share} |")
    if pairs_rows:
        lines += ["", "Query-key pairs per second, and the exp unit's share where the device is a known GPU "
                  "(one exp per pair forward, two with backward):", "",
                  "| op | shape | dtype | mode | provider | G pairs/s | % of exp-unit peak |",
                  "|---|---|---|---|---|---|---|"] + pairs_rows
    if roof:
        lines += ["", f"Fused forward against the roofline ({gpu}: {PEAKS[gpu]['bw'] / 1e12:.2f} TB/s HBM, "
                  "vendor dense peaks):", "",
                  "| op | shape | dtype | bytes | FLOPs | % of HBM BW | % of peak FLOP/s | bound |",
                  "|---|---|---|---|---|---|---|---|"] + roof
    return "\n".join(lines) + "\n"


def plot(path_png: str, rows: list) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    cases = collections.OrderedDict()
    for r in rows:
        cases.setdefault(f"{r.get('shape')} {r.get('dtype', '').replace('torch.', '')} {r['mode']}", {})[r["provider"]] = r["median"]
    providers = sorted({p for c in cases.values() for p in c})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cases) + 2), 4))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j in range(len(cases))]
        ys = [c.get(p, 0) * 1e3 for c in cases.values()]
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(list(cases), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("median time (ms)")
    ax.set_yscale("log")
    ax.legend()
    dev = rows[0].get("device", "")
    ax.set_title(f"{rows[0].get('op', '')} — {dev} — {rows[0].get('date', '')}", fontsize=9)
    fig.tight_layout()
    atomic_write(path_png, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="markdown + plot from pytest-benchmark JSON")
    p.add_argument("files", nargs="*")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(os.path.dirname(__file__), "results", "*.json")))
    if not files:
        print("error: no result files given and none in benchmarks/results/", file=sys.stderr)
        return 2
    for path in files:
        try:
            data, rows = load(path)
        except (OSError, json.JSONDecodeError, KeyError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
        if "benchmarks" not in data:  # e.g. saved_memory_cpu.json: another script's result, with its own .md
            print(f"skipped {path}: not a pytest-benchmark result")
            continue
        out_dir = args.out_dir or os.path.dirname(os.path.abspath(path))
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        md = build_markdown(path, data, rows)
        atomic_write(stem + ".md", lambda f: f.write(md), mode="w")
        made_png = plot(stem + ".png", rows) if rows else False
        print(f"wrote {stem}.md" + (f" and {stem}.png" if made_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
