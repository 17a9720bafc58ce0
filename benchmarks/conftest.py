"""Benchmarks are not collected by a plain ``pytest`` (testpaths = tests). Run them with
``pytest benchmarks --benchmark-only`` (timed) or ``--benchmark-disable`` (CI smoke: once each)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
