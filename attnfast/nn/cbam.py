"""CBAM and light CBAM whose gates run the fused ``attnfast::cbam`` op.

Drop-ins for ``attnfast.reference.CBAM`` / ``LightCBAM`` (subclasses of them, one each) and timm's
``CbamModule`` / ``LightCbamModule``: the same constructor arguments and the same parameter and buffer
names (``channel.fc1.weight``, ``channel.fc2.weight``, optional ``.bias``, ``spatial.conv.conv.weight``,
``spatial.conv.bn.*``), so state dicts load both ways. The MLP activation must be ReLU and the gates sigmoid
(timm's defaults, the only ones the fused op computes); anything else is a ValueError at construction. The op
validates ``x`` against the weights (ValueError); the module checks only its configuration.
"""
from __future__ import annotations

import torch.nn as nn

from ..ops.cbam import cbam
from ..reference.cbam import CBAM as _Reference
from ..reference.cbam import LightCBAM as _LightReference


def _check_config(act_layer, gate_layer, spatial_kernel_size) -> None:
    if act_layer is not nn.ReLU and not (isinstance(act_layer, str) and act_layer.lower() == "relu"):
        raise ValueError(f"the fused CBAM computes a ReLU MLP; got act_layer={act_layer!r} "
                         "(use attnfast.reference.CBAM or timm's module for other activations)")
    if gate_layer is not nn.Sigmoid and not (isinstance(gate_layer, str) and gate_layer.lower() == "sigmoid"):
        raise ValueError(f"the fused CBAM computes sigmoid gates; got gate_layer={gate_layer!r} "
                         "(use timm's module for other gates)")
    if spatial_kernel_size % 2 == 0:
        raise ValueError(f"spatial_kernel_size must be odd (same-size k // 2 padding); got {spatial_kernel_size}")


def _init(self, channels: int, rd_ratio: float = 1.0 / 16, rd_channels: int | None = None, rd_divisor: int = 1,
          spatial_kernel_size: int = 7, act_layer=nn.ReLU, gate_layer="sigmoid", mlp_bias: bool = False,
          device=None, dtype=None):
    """timm's constructor; the reference's (``reference.LightCBAM`` shares ``reference.CBAM``'s) builds the
    layers of ``self``'s class."""
    _check_config(act_layer, gate_layer, spatial_kernel_size)
    _Reference.__init__(self, channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                        spatial_kernel_size=spatial_kernel_size, act_layer=nn.ReLU, mlp_bias=mlp_bias)
    if device is not None or dtype is not None:
        self.to(device=device, dtype=dtype)


def fused_forward(self, x):
    """The fused forward of a module in timm's CBAM layout (``channels``, ``light``, ``channel.fc1``/``fc2``,
    ``spatial.conv.conv``/``bn``), with the BatchNorm bookkeeping (``num_batches_tracked``, cumulative
    ``momentum=None``) done as ``nn.BatchNorm2d`` does it. ``attnfast.nn.cbam_authors`` calls it on a view of
    the authors' layout."""
    fc1, fc2 = self.channel.fc1, self.channel.fc2
    conv, bn = self.spatial.conv.conv, self.spatial.conv.bn
    # The BatchNorm follows its own train/eval flag, as nn.BatchNorm2d does: a frozen BN (``bn.eval()``
    # inside a model in train mode, the usual fine-tuning setup) keeps using and keeping its running stats.
    # num_batches_tracked counts the batch once the op accepted it (a rejected input changes nothing).
    bn_training = bn.training
    track = bn_training and bn.track_running_stats and bn.num_batches_tracked is not None
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if track and bn.momentum is None:
        momentum = 1.0 / float(bn.num_batches_tracked + 1)
    use_running = not bn_training or bn.track_running_stats
    y = cbam(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, conv.weight, bn.weight, bn.bias,
             bn.running_mean if use_running else None, bn.running_var if use_running else None,
             training=bn_training or bn.running_mean is None, momentum=momentum, eps=bn.eps, light=self.light)
    if track:
        bn.num_batches_tracked.add_(1)
    return y


class CBAM(_Reference):
    """Fused CBAM: channel gate then spatial gate (timm's ``CbamModule``)."""

    light = False
    __init__ = _init
    forward = fused_forward


class LightCBAM(_LightReference):
    """Fused light CBAM: the pools averaged before one MLP and a one-channel conv (timm's ``LightCbamModule``)."""

    light = True
    __init__ = _init
    forward = fused_forward
