"""CBAM in timm's layout: attnfast's reference ``CBAM`` / ``LightCBAM``, timm's ``CbamModule`` /
``LightCbamModule`` (and copies) -> ``attnfast.nn.cbam.CBAM`` / ``LightCBAM``.

Layout: a ``channel`` child with 1x1 ``fc1``/``fc2`` (optional biases, a ReLU ``act``, a sigmoid ``gate``) and a
``spatial.conv`` with ``conv`` (odd k x k to one channel, 'same' padding, no bias) and a one-channel ``bn`` with
BatchNorm2d's default settings; the spatial conv takes two pooled maps [mean, max] (CBAM) or one (light CBAM).
The fused module is built with attnfast's own children and adopts the Parameters and buffers of timm's (its
BatchNorm's settings are BatchNorm2d's defaults, hence the check). The CBAM authors' layout is ``cbam_authors``.
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.cbam import CBAM as Fused
from ...nn.cbam import LightCBAM as FusedLight
from ...reference.cbam import CBAM as Reference
from ...reference.cbam import LightCBAM as LightReference
from ..family import (Candidate, Family, NotSwappable, Spec, has_modules, randn, require_conv1x1,
                      require_plain_conv)


def _looks_like(m: nn.Module, light: bool) -> bool:
    channel, spatial = m._modules.get("channel"), m._modules.get("spatial")
    conv = getattr(getattr(spatial, "conv", None), "conv", None)
    if not isinstance(channel, nn.Module) or not has_modules(channel, "fc1", "fc2") or not isinstance(conv, nn.Conv2d):
        return False
    return conv.in_channels == (1 if light else 2)  # the light spatial gate convolves one pooled map, CBAM two


def cbam_spec(m: nn.Module) -> Spec:
    fc1 = require_conv1x1(m.channel.fc1, "channel.fc1", bias=None)
    fc2 = require_conv1x1(m.channel.fc2, "channel.fc2", bias=fc1.bias is not None, out_channels=fc1.in_channels)
    if fc2.in_channels != fc1.out_channels:
        raise NotSwappable(f"channel.fc1 has {fc1.out_channels} outputs but channel.fc2 takes {fc2.in_channels}")
    act = getattr(m.channel, "act", None)
    if act is not None and type(act) is not nn.ReLU:
        raise NotSwappable(f"channel.act is {type(act).__name__}; the fused CBAM computes a ReLU MLP")
    for where in ("channel", "spatial"):
        gate = getattr(getattr(m, where), "gate", None)
        if gate is not None and type(gate).__name__ != "Sigmoid":  # nn.Sigmoid or timm's Sigmoid
            raise NotSwappable(f"{where}.gate is {type(gate).__name__}; the fused CBAM computes sigmoid gates")
    conv, bn = m.spatial.conv.conv, getattr(m.spatial.conv, "bn", None)
    require_plain_conv(conv, "spatial.conv.conv")
    k = conv.kernel_size[0]
    if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1) or conv.padding != (k // 2, k // 2)
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is not None or conv.out_channels != 1):
        raise NotSwappable(f"spatial.conv.conv is not an odd k x k, stride-1, 'same'-padded, bias-free conv to one "
                           f"channel (kernel {conv.kernel_size}, padding {conv.padding}, bias {conv.bias is not None})")
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != 1:
        raise NotSwappable(f"spatial.conv.bn is {type(bn).__name__}, not a one-channel BatchNorm2d")
    for extra in ("act", "drop"):  # timm's BatchNormAct2d: only as a plain BatchNorm
        layer = getattr(bn, extra, None)
        if layer is not None and not isinstance(layer, nn.Identity):
            raise NotSwappable(f"spatial.conv.bn.{extra} is {type(layer).__name__}; the fused CBAM's BatchNorm has "
                               "none")
    # the fused module is built with nn.BatchNorm2d's defaults; its tensors are adopted, its settings are not
    if (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) != (1e-5, 0.1, True, True):
        raise NotSwappable(f"spatial.conv.bn has eps={bn.eps}, momentum={bn.momentum}, affine={bn.affine}, "
                           f"track_running_stats={bn.track_running_stats}; the fused CBAM uses BatchNorm2d's defaults")
    c = fc1.in_channels
    kwargs = {"rd_channels": fc1.out_channels, "spatial_kernel_size": k, "mlp_bias": fc1.bias is not None}

    def inputs(gen, dtype, device):
        return (randn(gen, dtype, device, 2, c, 6, 5),)

    return Spec((c,), [Candidate(kwargs)], inputs)


class Cbam(Family):
    name = "cbam"
    title = "CBAM (timm CbamModule layout)"
    fused = Fused
    reference = Reference
    fused_runs = frozenset()  # the fused CBAM reads the gates' weights itself: it calls none of the children

    def matches(self, m: nn.Module) -> bool:
        return _looks_like(m, light=False)

    def spec(self, m: nn.Module) -> Spec:
        return cbam_spec(m)


class LightCbam(Cbam):
    name = "light_cbam"
    title = "light CBAM (timm LightCbamModule layout)"
    fused = FusedLight
    reference = LightReference

    def matches(self, m: nn.Module) -> bool:
        return _looks_like(m, light=True)
