"""Output allocation for attnfast ops.

All kernel outputs are allocated here. With ``NAN_FILL = True`` (a test-only knob: tests/conftest.py
sets it, and monkeypatching it works) fresh floating buffers are filled with NaN, so an element a kernel
forgot to write shows up as NaN in the comparison instead of passing by luck with leftover memory.
"""
from __future__ import annotations

import torch

NAN_FILL = False


def _poison(t: torch.Tensor) -> torch.Tensor:
    if NAN_FILL and t.is_floating_point() and t.numel():
        t.fill_(float("nan"))
    return t


def empty(*size, **kwargs) -> torch.Tensor:
    return _poison(torch.empty(*size, **kwargs))


def empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    return _poison(torch.empty_like(t, **kwargs))


def empty_strided(size, stride, **kwargs) -> torch.Tensor:
    return _poison(torch.empty_strided(size, stride, **kwargs))
