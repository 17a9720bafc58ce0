"""SAGAN self-attention with plain 1x1 convolutions: attnfast's reference ``SelfAttention``, the forum seed's
``SelfAttention`` and the SAGAN repository's ``Self_Attn`` (and copies) -> ``attnfast.nn.SelfAttention2d``.

Layout: 1x1 ``nn.Conv2d`` children ``query_conv`` / ``key_conv`` (``max(in_dim // 8, 1)`` channels) and
``value_conv`` (``in_dim``), all with bias, and a ``gamma`` Parameter of shape (1,). Candidates: tuple
``(out, attention)`` or tensor output, times a logit scale of 1, 1/sqrt(d) or 1/sqrt(in_dim). Spectral-norm,
parametrized or bias-free projections are ``sagan_projected``'s.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

from ...nn.self_attention import SelfAttention2d as Fused
from ...reference.self_attention import SelfAttention as Reference
from ...reference.self_attention import qk_dim
from ..family import Candidate, Family, NotSwappable, Spec, has_modules, randn, require_conv1x1, require_tensors

TENSORS = {"query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
           "value_conv.weight", "value_conv.bias", "gamma"}
ATTENTION_NOTE = ("returns (out, None) where the original returned (out, attention): attnfast does not build "
                  "the N x N attention matrix; attnfast.nn.self_attention.attention_maps(layer, x, queries) "
                  "computes chosen rows of it")
PROJECTIONS = ("query_conv", "key_conv", "value_conv")


def output_candidates(known: tuple | None, d: int, c: int, extra: dict | None = None) -> list:
    """SAGAN's candidates: (tuple_output, scale) as ``known``, or every combination the copies in the wild use."""
    if known is not None:
        options = [known]
    else:
        scales = list(dict.fromkeys([1.0, 1.0 / math.sqrt(d), 1.0 / math.sqrt(c)]))
        options = list(itertools.product([True, False], scales))
    return [Candidate({**(extra or {}), "tuple_output": t, "scale": s}, dropped=(1,) if t else (),
                      note=ATTENTION_NOTE if t else "") for t, s in options]


def feature_map_inputs(c: int, h: int = 4, w: int = 6):
    def inputs(gen, dtype, device):
        return (randn(gen, dtype, device, 2, c, h, w),)
    return inputs


def require_gamma(m: nn.Module, shape: tuple) -> nn.Parameter:
    gamma = getattr(m, "gamma", None)
    if not isinstance(gamma, nn.Parameter) or tuple(gamma.shape) != shape:
        raise NotSwappable(f"gamma must be an nn.Parameter of shape {shape}; got "
                           f"{tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__}")
    return gamma


class Sagan(Family):
    name = "sagan"
    title = "SAGAN self-attention (forum SelfAttention, SAGAN repo Self_Attn)"
    fused = Fused
    reference = Reference
    fused_runs = frozenset(PROJECTIONS)  # nothing calls the layer's ``softmax`` (an nn.Softmax(dim=-1))
    # ``softmax``: the seed's parameter-free nn.Softmax child, which the probe checks (the fused op is the softmax)
    reads = frozenset({"softmax", "scale", "tuple_output"})

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, *PROJECTIONS)

    def spec(self, m: nn.Module) -> Spec:
        v = require_conv1x1(m.value_conv, "value_conv", bias=True)
        c, d = v.in_channels, qk_dim(v.in_channels)
        if getattr(m, "pool", False) or getattr(m, "heads", 1) != 1 or getattr(m, "out_conv", None) is not None:
            raise NotSwappable("pool, heads or value_dim options have no plain-PyTorch reference equivalent")
        q = require_conv1x1(m.query_conv, "query_conv", bias=True, out_channels=d)
        k = require_conv1x1(m.key_conv, "key_conv", bias=True, out_channels=d)
        require_conv1x1(v, "value_conv", bias=True, out_channels=c)
        if q.in_channels != c or k.in_channels != c:
            raise NotSwappable(f"query_conv/key_conv/value_conv input channels differ ({q.in_channels}, "
                               f"{k.in_channels}, {c})")
        require_gamma(m, (1,))
        require_tensors(m, TENSORS)
        known = (m.tuple_output, m.scale) if isinstance(m, (Reference, Fused)) else None
        return Spec((c,), output_candidates(known, d, c, {"activation": getattr(m, "activation", None)}),
                    feature_map_inputs(c))
