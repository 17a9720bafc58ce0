"""Comparison helpers for kernel-versus-reference tests (importable by tests and benchmarks).

The three-way rule: a result in dtype ``d`` is compared with a float64 reference; its error may
be at most ``factor`` (2) times the error of eager PyTorch computing the same thing in ``d``,
plus a small ``atol`` scaled by the reference's magnitude. This adapts the tolerance to how hard
the computation is in that dtype instead of hand-tuning one per test.
"""
from __future__ import annotations

import torch

BASE_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    d = (a.detach().double() - b.detach().double()).abs()
    if torch.isnan(d).any():
        return float("inf")
    return d.max().item()


def three_way_check(out, ref64, eager, *, factor: float = 2.0, atol: float | None = None, name: str = "output"):
    """Return (ok, message). ``out`` and ``eager`` share a dtype; ``ref64`` is the float64 truth."""
    if out is None or ref64 is None:
        if out is None and ref64 is None:
            return True, f"{name}: both None"
        return False, f"{name}: one side is None (out={out is None}, ref={ref64 is None})"
    if out.shape != ref64.shape:
        return False, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    scale = max(1.0, ref64.detach().abs().max().item()) if ref64.numel() else 1.0
    if atol is None:
        atol = BASE_ATOL.get(out.dtype, 1e-5)
    atol = atol * scale
    err = max_abs_err(out, ref64)
    err_eager = max_abs_err(eager, ref64) if eager is not None else 0.0
    bound = factor * err_eager + atol
    msg = (f"{name}: max|err|={err:.3e}, eager max|err|={err_eager:.3e}, bound={bound:.3e} "
           f"(dtype {out.dtype}, shape {tuple(out.shape)})")
    return err <= bound, msg


def assert_close_3way(out, ref64, eager, **kwargs) -> None:
    """Assert the three-way rule on tensors or (nested) tuples/lists of tensors."""
    if isinstance(out, (tuple, list)):
        name = kwargs.pop("name", "output")
        if not (len(out) == len(ref64) == len(eager)):
            raise AssertionError(f"{name}: lengths differ: {len(out)}, {len(ref64)}, {len(eager)}")
        for i, (o, r, e) in enumerate(zip(out, ref64, eager)):
            assert_close_3way(o, r, e, name=f"{name}[{i}]", **kwargs)
        return
    ok, msg = three_way_check(out, ref64, eager, **kwargs)
    if not ok:
        raise AssertionError(msg)
