"""BigGAN's self-attention (BigGAN-PyTorch ``layers.Attention``; also SAGAN's official TF layout):
``theta``/``phi``/``g``/``o`` bias-free (spectral-norm) 1x1 convolutions to C/8, C/8, C/2 and back to C, keys and
values 2x2 max-pooled, a scalar ``gamma`` of shape (), ``out = gamma * o(attention) + x`` ->
``attnfast.nn.ProjectedSelfAttention2d`` calling the layer's own ``theta``/``phi``/``g``/``o`` (so BigGAN's
``SNConv2d`` power iteration, ``nn.utils.spectral_norm`` and parametrizations keep working in train mode).

The original's forward reads ``self.ch`` to reshape: it must equal the input channels (checked; the fused module
takes the channels from the tensors). Its ``F.max_pool2d(.., [2, 2])`` floors odd sizes, as the fused module does
(the original's reshape then fails on odd sizes; the fused module computes them).
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Candidate, NotSwappable, Spec, has_modules
from ._projected import ProjectedFamily
from .sagan import feature_map_inputs, require_gamma


class BigGan(ProjectedFamily):
    name = "biggan"
    title = "BigGAN self-attention (BigGAN-PyTorch layers.Attention: theta/phi/g/o)"
    roles = ("theta", "phi", "g")
    post = ("o",)
    reads = frozenset({"ch"})  # fixed: checked against the channels

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, "theta", "phi", "g", "o")

    def spec(self, m: nn.Module) -> Spec:
        theta, phi, g, o = self.projections(m, ("theta", "phi", "g", "o"))
        c = theta.in_channels
        if phi.in_channels != c or g.in_channels != c or o.out_channels != c or o.in_channels != g.out_channels:
            raise NotSwappable(f"theta/phi/g must take {c} channels and o map g's {g.out_channels} back to {c}; got "
                               f"phi {phi.in_channels}, g {g.in_channels}, o {o.in_channels}->{o.out_channels}")
        if theta.out_channels != phi.out_channels:
            raise NotSwappable(f"theta and phi widths differ ({theta.out_channels}, {phi.out_channels})")
        ch = getattr(m, "ch", c)
        if ch != c:
            raise NotSwappable(f"its ch attribute is {ch!r} but its convolutions take {c} channels")
        require_gamma(m, ())
        return Spec((), [Candidate({"pool": True, "scale": 1.0})], feature_map_inputs(c, 4, 6))
