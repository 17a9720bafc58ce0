"""Backend selection shared by every attnfast op: ``kernel_eligible`` is THE rule.

- The backend (``attnfast.config``: ``ATTNFAST_BACKEND`` read at import, ``config.set_backend`` /
  ``config.backend(...)`` at run time): ``auto`` runs the Triton kernels on CUDA tensors and the PyTorch path
  on CPU tensors; ``torch`` forces the PyTorch path everywhere; ``triton`` forces the Triton kernels, which on
  CPU tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` set before ``attnfast.kernels`` is imported).
- ``kernel_eligible(op, *tensors, limit=...)``: the backend wants the kernels (``use_triton``), the dtype has
  kernels (``attnfast.kernels._launch.DTYPES``) and the op's own ``limit`` (a shape its kernels do not take)
  passes. A CUDA call that falls back warns once per (op, reason).
- bfloat16 never runs on the interpreter (its bf16 arithmetic is wrong): ``use_triton`` raises
  RuntimeError there, for every op, instead of returning garbage.
"""
from __future__ import annotations

import functools
import inspect
import os
import typing
from typing import Callable, Optional

import torch

from . import config


def backend_setting() -> str:
    """The backend in force (``attnfast.config.get_backend()``)."""
    return config.get_backend()


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its interpreter: Triton's own ``TRITON_INTERPRET`` (not an attnfast
    setting; Triton reads it when a kernel module is imported, so it is read here, not cached)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_interpretable(tensors) -> None:
    """The Triton interpreter (``TRITON_INTERPRET=1``) computes bfloat16 wrong (a 16x16 bf16 ``tl.dot`` is
    off by ~1e10 in triton 3.8's): refuse bf16 there rather than return garbage."""
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise RuntimeError(
            "attnfast: bfloat16 cannot run on the Triton interpreter (TRITON_INTERPRET=1 computes bf16 "
            "arithmetic wrong); use the PyTorch path (ATTNFAST_BACKEND=torch, or auto on CPU tensors), "
            "compiled kernels on a GPU, or float32/float16")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors should run its Triton kernels (RuntimeError where they cannot)."""
    mode = backend_setting()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        use = on_cuda and triton_available()
    elif not triton_available():
        raise RuntimeError("ATTNFAST_BACKEND=triton but triton is not installed")
    elif on_cuda or interpreter_enabled():
        use = True
    else:
        raise RuntimeError(
            "ATTNFAST_BACKEND=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before attnfast.kernels is imported (or use ATTNFAST_BACKEND=torch / auto)")
    if use and interpreter_enabled():
        check_interpretable(tensors)
    return use


def kernel_eligible(op: str, *tensors: torch.Tensor, limit: Optional[Callable[[], Optional[str]]] = None) -> bool:
    """THE rule every op asks before launching its Triton kernels on ``tensors`` (the first one's dtype
    decides): the backend wants the kernels (``use_triton``; RuntimeError where it wants them and they
    cannot run), ``attnfast.kernels`` has kernels for the dtype, and ``limit()`` (the op's own: a reason
    string for a shape its kernels do not take, None when they do; called only after the checks before
    it passed, so it may import the kernel module) is None. CUDA tensors that fall back warn once per
    (op, reason) that the slower PyTorch path runs."""
    if not use_triton(*tensors):
        return False
    from .kernels._launch import DTYPES

    dtype = tensors[0].dtype
    reason = f"no Triton kernel for {dtype}" if dtype not in DTYPES else (limit() if limit is not None else None)
    if reason is None:
        return True
    if tensors[0].is_cuda:
        warn_fallback(op, reason)
    return False


def autocast_dtype(device_type: str):
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast (meta, ...)
        return None
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def autocast_off(fn):
    """Run a custom op's implementation with autocast disabled on its device.

    A torch.library custom op has no autocast rule, so without this the PyTorch math inside it
    (einsum, bmm, ...) would be autocast to 16 bits while the op promises fp32 statistics."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    # custom_op infers the schema from the signature; resolve its annotations against fn's own module
    # (they may be strings under ``from __future__ import annotations``, naming types imported there).
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    wrapper.__signature__ = sig.replace(
        parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()],
        return_annotation=hints.get("return", sig.return_annotation))
    return wrapper


_WARNED = set()


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) when CUDA tensors take the slower PyTorch path."""
    import warnings

    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"attnfast.{op}: {reason}; using the PyTorch path on CUDA (correct, slower)", stacklevel=3)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the PyTorch paths: float64 stays float64, everything else runs in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
