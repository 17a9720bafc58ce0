"""timm models for attnfast's trainer: ``resnet50-cbam`` and any other timm model name.

A model name that is not one of attnfast's own (``attnvgg``, ``ran56``, ``ran92``, ``sagan_resnet``) names a
timm model:

- ``ARCH-cbam`` / ``ARCH-lcbam``: ``timm.create_model(ARCH, block_args=dict(attn_layer='cbam'))`` (or
  ``'lcbam'``), i.e. timm's ``CbamModule`` / ``LightCbamModule`` in every residual block. ``block_args`` is an
  argument of timm's ResNet family (``resnet18`` ... ``resnet152``, ``resnet26d``, ``resnext50_32x4d``, ...);
  other architectures reject it with a ``ValueError`` that says so.
- ``ARCH``: ``timm.create_model(ARCH)`` as timm defines it (any name ``timm.list_models()`` gives, with or
  without a pretrained tag such as ``resnet50.a1_in1k``).

Models are built with ``pretrained=False`` (nothing is downloaded) and timm's own modules: the reference
computation (``attention="reference"``). With ``attention="fused"`` (what ``attnfast.models.create_model`` and
``attnfast train`` default to) ``attnfast.swap`` then puts attnfast's fused modules in, and a line saying what it
replaced, and what stayed timm's own, goes to ``report``. timm is an optional dependency (``attnfast[timm]``);
without it every function here raises ``ImportError`` with the install command.
"""
from __future__ import annotations

import collections
import re

# name suffix -> timm's attn_layer name (timm.layers.create_attn)
ATTN_SUFFIXES = {"-cbam": "cbam", "-lcbam": "lcbam"}
INSTALL_HINT = "pip install timm, or pip install 'attnfast[timm]'"


def parse_name(name: str) -> tuple:
    """``'resnet50-cbam'`` -> ``('resnet50', 'cbam')``; ``'resnet18'`` -> ``('resnet18', None)``."""
    for suffix, layer in ATTN_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], layer
    return name, None


def _timm():
    try:
        import timm
    except ImportError:
        raise ImportError(f"timm is not installed ({INSTALL_HINT})") from None
    return timm


def check_name(name: str) -> tuple:
    """``(arch, attn_layer)`` of a timm model name; ``ImportError`` without timm, ``ValueError`` if unknown."""
    arch, layer = parse_name(name)
    if not _timm().is_model(arch):
        raise ValueError(f"{arch!r} is not a timm model name (timm.list_models() lists them)")
    return arch, layer


def create(name: str, num_classes: int, *, attention: str = "fused", drop_rate: float | None = None,
           report: list | None = None):
    """The timm model ``name`` (see the module docstring) with ``num_classes`` outputs, ``pretrained=False``;
    ``attention="fused"`` swaps attnfast's fused modules in (appending what swap did to ``report``)."""
    if attention not in ("fused", "reference"):
        raise ValueError(f"attention must be 'fused' or 'reference'; got {attention!r}")
    model = _build(name, num_classes, drop_rate)
    if attention == "reference":
        return model
    from ..swap import swap

    replaced = swap(model)
    model = getattr(replaced, "model", None) or model
    if report is not None:
        report.append(swap_line(name, replaced, attention_modules(model)))
    return model


def swap_line(name: str, replaced, left: dict) -> str:
    """One line: what ``attnfast.swap`` replaced in the model ``name`` and which timm modules stayed."""
    if replaced:
        kinds = collections.Counter((r.old_type.rsplit(".", 1)[-1], r.new_type.rsplit(".", 1)[-1]) for r in replaced)
        what = ", ".join(f"{n} {old} -> {new}" for (old, new), n in sorted(kinds.items()))
        line = f"attnfast.swap replaced {len(replaced)} modules of {name} with fused ones ({what})"
    else:
        line = f"attnfast.swap found no module of {name} to replace"
    if left:
        kinds = collections.Counter(left.values())
        line += "; " + ", ".join(f"{n} timm {k}" for k, n in sorted(kinds.items())) + " stay timm's own"
    return line


def _build(name: str, num_classes: int, drop_rate: float | None):
    arch, layer = check_name(name)
    kwargs = {"pretrained": False, "num_classes": num_classes}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if layer is not None:
        kwargs["block_args"] = {"attn_layer": layer}
    try:
        return _timm().create_model(arch, **kwargs)
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad is None:
            raise
        if bad.group(1) == "block_args":
            raise ValueError(f"timm's {arch} takes no block_args, so the -{layer} suffix cannot put "
                             f"{layer.upper()} into its blocks; it works with timm's ResNet family "
                             "(resnet18 ... resnet152, resnet26d, resnext50_32x4d, ...)") from None
        raise ValueError(f"timm's {arch} takes no {bad.group(1)} argument") from None


def attention_modules(model) -> dict:
    """``{qualified name: class name}`` of the timm CBAM modules in ``model``."""
    names = {"CbamModule", "LightCbamModule"}
    return {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in names}


__all__ = ["ATTN_SUFFIXES", "parse_name", "check_name", "create", "swap_line", "attention_modules"]
