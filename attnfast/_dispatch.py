"""Backend selection shared by every attnfast op.

- CUDA tensors run the Triton kernels; CPU tensors run the PyTorch path.
- ``ATTNFAST_BACKEND=torch`` forces the PyTorch path everywhere.
- ``ATTNFAST_BACKEND=triton`` forces the Triton kernels; on CPU tensors that needs the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``attnfast.kernels`` is imported).
"""
from __future__ import annotations

import functools
import os

import torch

_VALID = ("auto", "triton", "torch")


def backend_setting() -> str:
    mode = os.environ.get("ATTNFAST_BACKEND", "auto").strip().lower() or "auto"
    if mode not in _VALID:
        raise ValueError(f"ATTNFAST_BACKEND must be one of {', '.join(_VALID)}; got {mode!r}")
    return mode


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors should run its Triton kernels."""
    mode = backend_setting()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("ATTNFAST_BACKEND=triton but triton is not installed")
    if on_cuda or interpreter_enabled():
        return True
    raise RuntimeError(
        "ATTNFAST_BACKEND=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
        "before attnfast.kernels is imported (or use ATTNFAST_BACKEND=torch / auto)")
