"""Test harness shared by every attnfast test.

- Device: CUDA when PyTorch sees a GPU, else the CPU. On the CPU, ``TRITON_INTERPRET=1`` is set
  here, before any ``attnfast.kernels`` import, so the Triton kernels run in the interpreter.
- The ``device`` fixture is that device. A test that takes it builds its tensors and modules there,
  so the same parametrized matrix runs on CUDA (compiled kernels) on a GPU machine and on the CPU
  (interpreter) elsewhere.
- ``triton_backend`` forces the Triton kernels. On a GPU machine a test that uses it without the
  ``device`` fixture feeds CPU tensors, which need the interpreter: it is skipped there, at
  collection, with the reason. ``@pytest.mark.gpu`` tests (bf16, real model shapes, CUDA memory)
  are skipped without a GPU.
- On CUDA every test runs with TF32 off (cuDNN convolutions and matmuls), so fp32 means IEEE fp32
  in eager PyTorch and in the kernels; tests of the TF32 path turn it on (``op_checks.tf32``).
- ``attnfast._alloc.NAN_FILL = True``: every output buffer attnfast allocates starts as NaN (on any
  device), so an element a kernel does not write fails the comparison.
- The backend fixtures set ``attnfast.config.BACKEND`` (monkeypatched, restored after each test); the
  library reads no environment variable at run time.
- Every test is seeded.
- ``ATTNFAST_TEST_FAKE_CUDA=1`` makes collection behave as on a GPU machine without one (for
  ``--collect-only`` only: tests/test_gpu_matrix.py checks what a GPU run would collect and skip);
  running a test that way fails at once.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/seed_modules.py, tests/op_checks.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

FAKE_CUDA = os.environ.get("ATTNFAST_TEST_FAKE_CUDA", "0") == "1"
DEVICE = "cuda" if (FAKE_CUDA or torch.cuda.is_available()) else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
COMPILED_KERNELS = DEVICE == "cuda" and not INTERPRET  # what gpu-marked tests need
NEEDS_INTERPRETER = "runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (the device-taking tests cover CUDA)"

import attnfast._alloc  # noqa: E402  (torch only: no kernel module is imported here)
import attnfast.config  # noqa: E402

attnfast._alloc.NAN_FILL = True


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and compiled kernels (skipped otherwise)")
    config.addinivalue_line("markers", "slow: long-running test")


def uses_triton_on_cpu_tensors(item) -> bool:
    """A test that forces the Triton backend (fixture, or ``backend="triton_backend"`` parameter) but does
    not take ``device``: its tensors are CPU tensors, which only the interpreter can run."""
    names = getattr(item, "fixturenames", ())
    params = getattr(getattr(item, "callspec", None), "params", {})
    forced = "triton_backend" in names or params.get("backend") == "triton_backend"
    return forced and "device" not in names


def pytest_collection_modifyitems(config, items):
    if COMPILED_KERNELS:
        skip = pytest.mark.skip(reason=NEEDS_INTERPRETER)
        for item in items:
            if uses_triton_on_cpu_tensors(item):
                item.add_marker(skip)
        return
    reason = "needs a CUDA GPU" if DEVICE != "cuda" else "needs compiled kernels: unset TRITON_INTERPRET"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: that holds folder names (tests/gpu)
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if FAKE_CUDA:
        pytest.fail("ATTNFAST_TEST_FAKE_CUDA=1 is for --collect-only (there is no GPU to run on)")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cuda_ieee_fp32():
    """On CUDA: no TF32 unless a test asks for it, and the flags restored afterwards."""
    if DEVICE != "cuda":
        yield
        return
    from op_checks import tf32

    with tf32(False):
        yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch, request):
    """Force the Triton kernels: compiled on CUDA tensors, interpreted on CPU tensors.

    A test without the ``device`` fixture feeds CPU tensors; on a GPU machine (no interpreter) it is
    skipped (normally at collection; this covers a dynamic ``request.getfixturevalue``)."""
    if COMPILED_KERNELS and "device" not in request.fixturenames:
        pytest.skip(NEEDS_INTERPRETER)
    monkeypatch.setattr(attnfast.config, "BACKEND", "triton")
    return "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the PyTorch path of every op."""
    monkeypatch.setattr(attnfast.config, "BACKEND", "torch")
    return "torch"


@pytest.fixture
def kernels_only(monkeypatch):
    """CUDA tensors must run the Triton kernels: ``ATTNFAST_BACKEND=torch`` from the caller's shell is
    dropped (``triton``, e.g. from ``triton_backend``, stays), and a fallback to the PyTorch path
    (attnfast warns once per reason; the record is emptied here) fails the test."""
    import warnings

    from attnfast import _dispatch

    if attnfast.config.BACKEND == "torch":
        monkeypatch.setattr(attnfast.config, "BACKEND", "auto")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*using the PyTorch path on CUDA")
        yield
