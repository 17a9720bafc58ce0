"""pytest plugin: write each test's outcome the moment it finishes, so a run cut short keeps what it did.

    PYTHONPATH=benchmarks pytest tests/gpu -p gpu_progress --progress-jsonl OUT.jsonl

One JSON line per test, appended and flushed as soon as its call phase ends (or its setup fails or
skips): ``nodeid``, ``outcome``, ``duration_s``, the skip reason or the failure's last 2000 characters
and, for a pytest-benchmark test that ran, ``benchmark`` (the record pytest-benchmark writes into
``--benchmark-json``, without the raw samples). ``gpu_bench.py`` runs the GPU test suites with it and
counts the lines into its results.
"""
from __future__ import annotations

import json
import os

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
