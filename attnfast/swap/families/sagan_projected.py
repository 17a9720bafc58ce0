"""SAGAN self-attention whose projections are not plain biased ``nn.Conv2d``: ``nn.utils.spectral_norm``
(``weight_orig``), ``nn.utils.parametrizations.spectral_norm`` (``ParametrizedConv2d``), Conv2d subclasses (e.g.
BigGAN-PyTorch's ``SNConv2d``) or bias-free convolutions -> ``attnfast.nn.ProjectedSelfAttention2d`` calling the
layer's own ``query_conv``/``key_conv``/``value_conv`` (spectral norm keeps its power iteration in train mode).

Layout as ``sagan`` (query/key/value 1x1 convolutions, ``gamma`` of shape (1,), output ``out`` or ``(out,
attention)``); registered after it, so plain layers stay ``SelfAttention2d``.
"""
from __future__ import annotations

import torch.nn as nn

from ..family import NotSwappable, Spec, has_modules
from ._projected import ProjectedFamily
from .sagan import PROJECTIONS, feature_map_inputs, output_candidates, require_gamma


class SaganProjected(ProjectedFamily):
    name = "sagan_projected"
    title = "SAGAN self-attention with spectral-norm/parametrized/bias-free projections"
    roles = PROJECTIONS
    reads = frozenset({"softmax", "scale", "tuple_output"})  # softmax: the seed's parameter-free nn.Softmax child

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, *PROJECTIONS)

    def spec(self, m: nn.Module) -> Spec:
        q, k, v = self.projections(m, PROJECTIONS)
        c = v.in_channels
        if q.in_channels != c or k.in_channels != c or v.out_channels != c:
            raise NotSwappable(f"query_conv/key_conv/value_conv must map {c} channels (value back to {c}); got "
                               f"{q.in_channels}->{q.out_channels}, {k.in_channels}->{k.out_channels}, "
                               f"{v.in_channels}->{v.out_channels}")
        if q.out_channels != k.out_channels:
            raise NotSwappable(f"query_conv and key_conv widths differ ({q.out_channels}, {k.out_channels})")
        require_gamma(m, (1,))
        return Spec((), output_candidates(None, q.out_channels, c), feature_map_inputs(c))
