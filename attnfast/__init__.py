"""attnfast: fused Triton attention modules for CNN image classifiers.

- ``attnfast.reference``: plain-PyTorch modules faithful to the seeds (ground truth).
- ``attnfast.ops``: torch.library custom ops (autograd, PyTorch path, Triton dispatch).
- ``attnfast.kernels``: the Triton kernels (installed from the top-level ``kernels/`` folder).
- ``attnfast.nn``: drop-in modules over the ops; ``attnfast.models``: AttnVGG, RAN, ...
- ``attnfast.swap(model)`` / ``attnfast.unswap(model)``: put the fused modules into a model you already have
  (``attnfast.swap`` is a callable package: its families, probe and report live there).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use (keeps ``import attnfast`` light and free of import cycles).
_LAZY = {
    "GridAttention": "attnfast.nn.grid_attention",
    "SelfAttention2d": "attnfast.nn.self_attention",
    "ResidualAttentionModule": "attnfast.nn.residual_attention",
    "CBAM": "attnfast.nn.cbam",
    "LightCBAM": "attnfast.nn.cbam",
    "swap": None,  # the package attnfast.swap, which is callable: attnfast.swap(model)
    "unswap": "attnfast.swap",
    "config": None,  # attnfast.config: settings (ATTNFAST_BACKEND read at import; set_backend at run time)
    "reference": None,
    "ops": None,
    "nn": None,
    "models": None,
    "data": None,
    "train": None,
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'attnfast' has no attribute {name!r}")
    modname = _LAZY[name]
    if modname is None:
        value = importlib.import_module(f"attnfast.{name}")
    else:
        value = getattr(importlib.import_module(modname), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
