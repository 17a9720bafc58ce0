"""Layers that look like attention but that no family recognises: found by class name and by structure, so
that swap reports them instead of passing over them in silence.

A module looks like attention when

- its class name has an attention token: ``attention``/``attn``/``att``, ``gate``/``gated``/``gating``,
  ``cbam``/``bam``, ``nonlocal``/``nl``, ``gc``/``context``, ``se``/``squeeze``/``excitation``/``eca``, ... (the
  name split at CamelCase, underscores and digits; e.g. ``GCBlock``, ``Self_Attn``, ``NonLocalBlock``); or
- by its structure (containers such as ``nn.Sequential`` and the model itself excepted): a direct child that
  is a gate (a Sigmoid, Softmax or hard-sigmoid module; not LogSoftmax), or a forward whose code calls
  ``softmax``/``sigmoid``/``hardsigmoid`` by name, in a module that holds convolution or Linear layers. The
  forward is never run and its maths is not inferred: only the names its code mentions are read (so a block
  with an inline Swish, ``x * torch.sigmoid(x)``, is reported too: its reason says what was seen).

Such a module is reported as unknown unless it is a container of attention rather than a layer: a module
holding a recognised or fused layer, or more than ``MAX_LAYER_SIZE`` convolution/Linear layers (a network or a
stage named ``...AttentionNet``), is searched further instead. Modules under a reported layer are not reported.
"""
from __future__ import annotations

import re

import torch.nn as nn

from .reads import forward_names

MAX_LAYER_SIZE = 16  # conv/linear layers: above this a module named like attention is a network, not a layer
_TOKENS = {"attention", "attn", "att", "atten", "attend", "gate", "gated", "gating", "cbam", "bam", "nonlocal",
           "nl", "gc", "gcnet", "globalcontext", "se", "sse", "cse", "scse", "ese", "squeeze", "excitation", "excite",
           "eca", "ceca", "selfattention", "selfattn", "coordatt"}
_GATE_FUNCS = {"softmax", "sigmoid", "hardsigmoid", "hard_sigmoid", "softmax2d", "gumbel_softmax"}
_GATE_TOKENS = {"sigmoid", "softmax", "hardsigmoid", "softmax2d"}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)


def tokens(name: str) -> set:
    """CamelCase/underscore/digit-separated lower-case words of a class name, plus adjacent pairs joined."""
    parts = [p.lower() for p in re.findall(r"[A-Z]+(?=[A-Z][a-z]|\d|_|$)|[A-Z]?[a-z]+|[A-Z]+", name)]
    return set(parts) | {a + b for a, b in zip(parts, parts[1:])}


def layer_count(m: nn.Module) -> int:
    return sum(isinstance(s, _LAYERS) for s in m.modules())


def _is_gate(m: nn.Module) -> bool:
    words = tokens(type(m).__name__)
    return bool(words & _GATE_TOKENS) and "log" not in words  # LogSoftmax: a classifier's, not a gate


def attention_like(m: nn.Module, root: bool = False) -> str | None:
    """Why ``m`` looks like attention (a phrase for the report), or None. The structural tests are not applied
    to the model itself (``root``): a classifier's forward may end in a softmax."""
    cls = type(m)
    hits = sorted(tokens(cls.__name__) & _TOKENS)
    if hits:
        return f"its class name has {', '.join(repr(h) for h in hits)}"
    if root or isinstance(m, _CONTAINERS) or not layer_count(m):
        return None
    gates = [n for n, c in m._modules.items() if c is not None and _is_gate(c)]
    if gates:
        return f"a {type(m._modules[gates[0]]).__name__} gate ({gates[0]}) next to its conv/linear layers"
    if cls.__module__.split(".")[0] != "torch":
        called = sorted(forward_names(cls) & _GATE_FUNCS)
        if called:
            return f"its forward calls {', '.join(called)} and it holds conv/linear layers"
    return None


__all__ = ["attention_like", "layer_count", "tokens", "MAX_LAYER_SIZE"]
