"""Pick the plain-PyTorch or the fused implementation of an attention module by name."""
from __future__ import annotations

import importlib

_PACKAGES = {"reference": "attnfast.reference", "fused": "attnfast.nn"}


def attention_class(attention: str, name: str):
    """``attention_class('fused', 'GridAttention')`` -> ``attnfast.nn.GridAttention``."""
    if attention not in _PACKAGES:
        raise ValueError(f"attention must be 'reference' or 'fused'; got {attention!r}")
    return getattr(importlib.import_module(_PACKAGES[attention]), name)
