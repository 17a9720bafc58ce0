"""Models built from attnfast's attention modules, and a factory used by the CLI.

``create_model(name, num_classes, attention='fused'|'reference', **kwargs)`` with names:
``attnvgg``, ``ran56``, ``ran92``, ``sagan_resnet`` (self-attention at high resolution).
"""
from __future__ import annotations

import importlib

from .attnvgg import AttnVGG
from .ran import ResidualAttentionNet, ran56, ran92

# name -> (module, builder). Each builder takes (num_classes, attention=..., **kwargs).
MODEL_BUILDERS = {
    "attnvgg": ("attnfast.models.attnvgg", "build"),
    "ran56": ("attnfast.models.ran", "ran56"),
    "ran92": ("attnfast.models.ran", "ran92"),
    "sagan_resnet": ("attnfast.models.sagan", "build"),
}

__all__ = ["AttnVGG", "ResidualAttentionNet", "ran56", "ran92", "create_model", "MODEL_BUILDERS"]


def create_model(name: str, num_classes: int, attention: str = "fused", **kwargs):
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODEL_BUILDERS))}")
    modname, fn = MODEL_BUILDERS[name]
    return getattr(importlib.import_module(modname), fn)(num_classes, attention=attention, **kwargs)
