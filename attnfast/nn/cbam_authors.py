"""``AuthorsCBAM``: the fused ``attnfast::cbam`` op around the CBAM authors' own modules.

The authors' reference code (Park et al., Jongchan/attention-module ``MODELS/cbam.py``) writes CBAM as
``ChannelGate`` (``mlp = Sequential(Flatten, Linear(C, C/r), ReLU, Linear(C/r, C))``, biases on, pools
``['avg', 'max']``) then ``SpatialGate`` (``compress = ChannelPool``: [max, mean] over channels; ``spatial =
BasicConv``: a bias-free k x k conv to one channel, ``BatchNorm2d(1, eps=1e-5, momentum=0.01)``, no ReLU). The op
computes the same maths in timm's layout, so this module keeps the user's ``ChannelGate`` and ``SpatialGate``
objects (state_dict keys unchanged, the optimizer's Parameters the ones used) and adapts at each call:

- the Linear weights (C/r, C) are passed as 1x1 conv weights through a view (``weight[:, :, None, None]``);
- the spatial conv's two input channels are [max, mean] where the op's are [mean, max]: the (1, 2, k, k) weight
  is flipped on its input-channel axis (``flip(1)``: a 2k^2-element copy per call, inside autograd, so the
  gradient lands on the user's Parameter);
- the BatchNorm is the user's, with its own eps/momentum and train/eval flag (running statistics and
  ``num_batches_tracked`` updated as ``nn.BatchNorm2d`` does): the forward is ``attnfast.nn.cbam.CBAM``'s own,
  run on these views.

``no_spatial`` is honoured: set to True, the module runs the user's ``ChannelGate`` alone, as the original does.

One difference at exact ties: the original's max pools (``F.max_pool2d`` over H x W and ``torch.max`` over
channels) send a maximum's gradient to one of the tied elements; the op splits it evenly among them (as
``amax`` does). Values are identical; input gradients differ only where a channel's or a pixel's maximum is
attained more than once (e.g. an all-zero map after a ReLU).
"""
from __future__ import annotations

from types import SimpleNamespace as _ns

import torch.nn as nn

from .cbam import fused_forward

TIE_NOTE = ("at exact ties of a channel's or a pixel's maximum (e.g. all-zero maps after a ReLU) the input "
            "gradient of the max pools is split evenly among the tied elements (as amax does); the original's "
            "max_pool2d/torch.max gives it to one of them. Values and parameter gradients are the same")


class AuthorsCBAM(nn.Module):
    """See the module doc. ``channel_gate``/``spatial_gate``: the authors' ``ChannelGate``/``SpatialGate``
    objects; ``max_first``: the spatial conv's input channels are [max, mean] (the authors' ``ChannelPool``)."""

    def __init__(self, channel_gate: nn.Module, spatial_gate: nn.Module, *, max_first: bool = True):
        super().__init__()
        self.ChannelGate = channel_gate
        self.SpatialGate = spatial_gate
        self.no_spatial = False
        self.max_first = bool(max_first)
        fc1, fc2 = self._mlp()
        if fc1.in_features != fc2.out_features or fc2.in_features != fc1.out_features:
            raise ValueError(f"ChannelGate.mlp must be Linear(C, R), ReLU, Linear(R, C); got {fc1} and {fc2}")
        conv, bn = self._spatial()
        if bn.weight is None or bn.bias is None:
            raise ValueError("SpatialGate.spatial.bn must be affine (the op applies its weight and bias)")
        self.channels = fc1.in_features

    def _mlp(self):
        mlp = self.ChannelGate.mlp
        return mlp[1], mlp[3]

    def _spatial(self):
        spatial = self.SpatialGate.spatial
        return spatial.conv, spatial.bn

    def forward(self, x):
        if self.no_spatial:
            return self.ChannelGate(x)
        fc1, fc2 = self._mlp()
        conv, bn = self._spatial()
        # the fused CBAM's own forward (input checks, BatchNorm bookkeeping, the op) on adapted views of the
        # user's tensors: timm's layout, which that forward reads, with the Linear weights as 1x1 conv weights
        layout = _ns(channels=self.channels, light=False,
                     channel=_ns(fc1=_ns(weight=fc1.weight[:, :, None, None], bias=fc1.bias),
                                 fc2=_ns(weight=fc2.weight[:, :, None, None], bias=fc2.bias)),
                     spatial=_ns(conv=_ns(conv=_ns(weight=conv.weight.flip(1) if self.max_first else conv.weight),
                                          bn=bn)))
        return fused_forward(layout, x)


__all__ = ["AuthorsCBAM", "TIE_NOTE"]
