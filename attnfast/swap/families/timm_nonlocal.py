"""timm's ``NonLocalAttn`` (``attn_layer='nl'``): ``softmax(t^T p * scale)`` applied to ``g``, then ``z`` (1x1 conv)
and ``norm`` (BatchNorm2d), plus the input -> ``attnfast.nn.ProjectedSelfAttention2d`` calling the layer's own
``t``/``p``/``g``/``z``/``norm`` and reading ``scale`` (timm's ``self.scale``, copied onto the fused module).

``reset_parameters`` (initialisation) is not carried over (noted).
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Candidate, NotSwappable, Spec, has_modules
from ._projected import ProjectedFamily
from .sagan import feature_map_inputs


class TimmNonLocal(ProjectedFamily):
    name = "timm_nonlocal"
    title = "timm NonLocalAttn (t/p/g/z + norm)"
    roles = ("t", "p", "g")
    post = ("z", "norm")
    reads = frozenset({"scale"})  # the fused module reads its own ``scale`` at every call

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, "t", "p", "g", "z", "norm")

    def spec(self, m: nn.Module) -> Spec:
        t, p, g, z = self.projections(m, ("t", "p", "g", "z"))
        c = t.in_channels
        if p.in_channels != c or g.in_channels != c or z.in_channels != g.out_channels or z.out_channels != c:
            raise NotSwappable(f"t/p/g must take {c} channels and z map g's {g.out_channels} back to {c}")
        if t.out_channels != p.out_channels:
            raise NotSwappable(f"t and p widths differ ({t.out_channels}, {p.out_channels})")
        scale = getattr(m, "scale", None)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise NotSwappable(f"its scale attribute must be a number; got {scale!r}")
        return Spec((), [Candidate({"scale": float(scale)})], feature_map_inputs(c, 4, 5))
