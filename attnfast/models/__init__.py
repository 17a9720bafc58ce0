"""Models built from attnfast's attention modules, and a factory used by the CLI.

``create_model(name, num_classes, attention='fused'|'reference', **kwargs)`` with names:
``attnvgg``, ``ran56``, ``ran92``, ``sagan_resnet`` (self-attention at high resolution). Any other name is a
timm model (``resnet50-cbam``, ``resnet18-lcbam``, any timm name; see :mod:`attnfast.models.timm_models`):
timm's own modules for ``'reference'``, ``attnfast.swap`` applied for ``'fused'``.
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


def create_model(name: str, num_classes: int, attention: str = "fused", *, report: list | None = None, **kwargs):
    """The model ``name`` with ``num_classes`` outputs and ``attention`` modules (``'fused'`` or ``'reference'``).

    ``report``: a list to which a timm model built with ``attention='fused'`` appends one line saying what
    ``attnfast.swap`` replaced and what stayed timm's own (attnfast's models are built with their modules and
    append nothing).
    """
    if name not in MODEL_BUILDERS:
        from . import timm_models

        try:
            return timm_models.create(name, num_classes, attention=attention, report=report, **kwargs)
        except ImportError as e:
            raise ImportError(f"model {name!r} is not one of attnfast's ({', '.join(sorted(MODEL_BUILDERS))}), so "
                              f"it names a timm model, but {e}") from None
        except ValueError as e:
            if "not a timm model name" not in str(e):
                raise
            raise ValueError(f"unknown model {name!r}: not one of attnfast's ({', '.join(sorted(MODEL_BUILDERS))}) "
                             f"and {e}") from None
    modname, fn = MODEL_BUILDERS[name]
    return getattr(importlib.import_module(modname), fn)(num_classes, attention=attention, **kwargs)
