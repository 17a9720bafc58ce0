"""Helpers to launch elementwise kernels on tensors of any layout without copies.

The iteration order follows the output's memory order: all operands are permuted so the output
view is contiguous, then the kernel walks a flat index and decomposes it into 4-D coordinates,
reading every input through its own strides (stride 0 from ``expand``/``.sum()`` gradients
included).
"""
from __future__ import annotations

import torch


def as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > 4:
        raise ValueError(f"expected at most 4 dimensions, got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def memory_order(t: torch.Tensor) -> list:
    """Dimension order from outermost to innermost in memory (stable for ties)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d if t.shape[d] == 1 else 0))


def permuted_views(out: torch.Tensor, *others: torch.Tensor):
    """Permute 4-D views so that ``out`` is contiguous; returns (sizes, [strides per tensor])."""
    out4 = as_4d(out)
    order = memory_order(out4)
    views = [out4.permute(order)] + [as_4d(o).permute(order) for o in others]
    if not views[0].is_contiguous():
        raise ValueError("output buffer must be dense (non-overlapping and contiguous in some order)")
    sizes = list(views[0].shape)
    return sizes, [list(v.stride()) for v in views]


def shared_dense_layout(*tensors: torch.Tensor) -> bool:
    """Whether all tensors have one shape and one dense layout (the same strides wherever a size is
    above 1, and no gaps or overlaps: contiguous, channels_last, or any other permutation), so one
    flat offset addresses the same element in each."""
    first = tensors[0]
    for t in tensors:
        if t.shape != first.shape:
            return False
        if any(n > 1 and a != b for n, a, b in zip(t.shape, t.stride(), first.stride())):
            return False
    if first.dim() > 4:
        return False
    view = as_4d(first).permute(memory_order(as_4d(first)))
    return view.is_contiguous()
