"""pytest plugin: write each benchmark's result the moment it finishes, so a part cut short keeps its results.

    PYTHONPATH=benchmarks pytest benchmarks/test_bench_x.py -p gpu_progress --progress-jsonl OUT.jsonl

One JSON line per test, appended and flushed as soon as its call phase ends (or it is skipped):
``nodeid``, ``outcome``, ``duration_s`` and, for a benchmark that ran, ``benchmark``: the same record
pytest-benchmark writes into ``--benchmark-json`` (name, group, params, extra_info, stats without the
raw samples). pytest-benchmark writes its own JSON only at the end of the session.

    python benchmarks/gpu_progress.py OUT.jsonl RESULT.json

turns such a file into a pytest-benchmark-style JSON (``{"benchmarks": [...], "partial": true}``) that
``benchmarks/report.py`` reads, for a part whose session did not finish.
"""
from __future__ import annotations

import json
import os
import sys

import pytest


def pytest_addoption(parser):
    parser.addoption("--progress-jsonl", default=None, help="append one JSON line per finished test here")


def _record(item, rep) -> dict:
    rec = {"nodeid": item.nodeid, "outcome": rep.outcome, "duration_s": round(rep.duration, 6)}
    if rep.skipped and isinstance(rep.longrepr, tuple):
        rec["reason"] = str(rep.longrepr[2])
    elif rep.failed:
        rec["error"] = str(rep.longrepr)[-2000:]
    bench = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(bench, "stats", None)
    if meta:
        rec["benchmark"] = meta.as_dict(include_data=False)
    return rec


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    path = item.config.getoption("--progress-jsonl")
    if not path or not (rep.when == "call" or (rep.when == "setup" and not rep.passed)):
        return
    line = json.dumps(_record(item, rep), default=str)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def to_benchmark_json(jsonl_path: str) -> dict:
    """The benchmark records of a progress file, as pytest-benchmark's JSON layout (marked partial)."""
    benchmarks = []
    with open(jsonl_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("benchmark"):
                benchmarks.append(rec["benchmark"])
    return {"partial": True, "source": os.path.basename(jsonl_path), "benchmarks": benchmarks}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python benchmarks/gpu_progress.py PROGRESS.jsonl RESULT.json", file=sys.stderr)
        return 2
    from attnfast.train.checkpoint import atomic_write

    doc = to_benchmark_json(argv[0])
    atomic_write(argv[1], lambda f: json.dump(doc, f, indent=1), mode="w")
    print(f"{argv[1]}: {len(doc['benchmarks'])} benchmarks from {argv[0]} (partial)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
