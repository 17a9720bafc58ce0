"""Benchmarks are not collected by a plain ``pytest`` (testpaths = tests). Run them with
``pytest benchmarks --benchmark-only`` (timed) or ``--benchmark-disable`` (CI smoke: once each).

Under ``--benchmark-disable`` the compile providers use the ``aot_eager`` backend unless
``ATTNFAST_BENCH_COMPILE_BACKEND`` says otherwise: the smoke checks that each compiled graph is traced and
runs (``harness.CompileCounter``), and inductor's CPU code generation would add minutes to CI without
checking anything of ours. Timed runs keep inductor. Each result records its backend."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_configure(config):
    if getattr(config.option, "benchmark_disable", False):
        os.environ.setdefault("ATTNFAST_BENCH_COMPILE_BACKEND", "aot_eager")
