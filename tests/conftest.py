"""Test harness shared by every attnfast test.

- ``TRITON_INTERPRET=1`` is set here, before any ``attnfast.kernels`` import, when no GPU is present,
  so the Triton kernels run on the CPU.
- ``ATTNFAST_NAN_FILL=1``: every output buffer attnfast allocates starts as NaN, so an element a
  kernel does not write fails the comparison.
- Every test is seeded.
"""
import os
import random
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/seed_modules.py and friends


def _gpu_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


HAS_GPU = _gpu_present()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["ATTNFAST_NAN_FILL"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if (HAS_GPU and torch.cuda.is_available()) else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: long-running test")


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda" and not INTERPRET:
        return
    reason = "needs a CUDA GPU" if DEVICE != "cuda" else "needs compiled kernels: unset TRITON_INTERPRET"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch, request):
    """Force the Triton kernels (interpreted on CPU).

    These tests feed CPU tensors, so they need the interpreter. On a GPU machine (where this conftest
    leaves TRITON_INTERPRET unset so the GPU-marked tests run compiled kernels) they are skipped; run
    ``TRITON_INTERPRET=1 pytest`` there to include them."""
    if not INTERPRET and "gpu" not in request.keywords:
        pytest.skip("runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (GPU-marked tests cover CUDA)")
    monkeypatch.setenv("ATTNFAST_BACKEND", "triton")
    return "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the PyTorch path of every op."""
    monkeypatch.setenv("ATTNFAST_BACKEND", "torch")
    return "torch"
