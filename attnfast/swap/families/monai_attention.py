"""MONAI's Attention U-Net gate (``monai.networks.nets.attentionunet.AttentionBlock``, 2-D) and attnfast's
reference ``AttentionBlock`` -> ``attnfast.nn.attention_gate.AttentionBlock``.

Layout: ``W_g``, ``W_x``: ``Sequential(Convolution(conv_only=True) holding a 1x1 ``conv``, BatchNorm2d)``;
``psi``: ``Sequential(Convolution(1x1 -> 1 channel), BatchNorm2d(1), Sigmoid)``; ``relu``: ``nn.ReLU``. The
fused module keeps these Sequentials (MONAI's own objects: state_dict keys unchanged) and reads the convs' and
BatchNorms' tensors; psi's BatchNorm and Sigmoid run as themselves on the one-channel logits.
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.attention_gate import AttentionBlock as Fused
from ...reference.attention_gate import AttentionBlock as Reference
from ..family import (Candidate, Family, NotSwappable, Spec, has_modules, is_instance_of_loaded, randn,
                      require_conv1x1)


def _conv_bn(seq, name: str, n: int) -> tuple:
    """``seq`` is Sequential(conv-only wrapper, BatchNorm2d[, ...]) of length n: (its conv, its BatchNorm)."""
    if type(seq) is not nn.Sequential or len(seq) != n:
        raise NotSwappable(f"{name} is not a Sequential of {n} modules (convolution, BatchNorm2d"
                           f"{', Sigmoid' if n == 3 else ''})")
    wrap, bn = seq[0], seq[1]
    if list(wrap._modules) != ["conv"] or any(True for _ in wrap._parameters) or any(True for _ in wrap._buffers):
        raise NotSwappable(f"{name}.0 is not a conv-only Convolution (one child 'conv'; dropout, norm or act "
                           f"children change the maths)")
    conv = require_conv1x1(wrap.conv, f"{name}.0.conv", bias=None)
    if type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels:
        raise NotSwappable(f"{name}.1 is {type(bn).__name__}, not a BatchNorm2d({conv.out_channels})")
    return conv, bn


class MonaiAttention(Family):
    name = "monai_attention"
    title = "MONAI AttentionBlock (Attention U-Net gate)"
    fused = Fused
    reference = Reference
    fused_runs = frozenset()  # the op reads W_g/W_x/psi's tensors; psi's BatchNorm and Sigmoid run, psi itself not
    reads = frozenset()

    def matches(self, m: nn.Module) -> bool:
        return (is_instance_of_loaded(m, "monai.networks.nets.attentionunet", "AttentionBlock")
                or has_modules(m, "W_g", "W_x", "psi"))

    def spec(self, m: nn.Module) -> Spec:
        wg, _ = _conv_bn(m.W_g, "W_g", 2)
        wx, _ = _conv_bn(m.W_x, "W_x", 2)
        psi, _ = _conv_bn(m.psi, "psi", 3)
        if type(m.psi[2]) is not nn.Sigmoid:
            raise NotSwappable(f"psi.2 is {type(m.psi[2]).__name__}, not nn.Sigmoid")
        if type(getattr(m, "relu", None)) is not nn.ReLU:
            raise NotSwappable("relu is not an nn.ReLU")
        f_int = wg.out_channels
        if wx.out_channels != f_int or psi.in_channels != f_int or psi.out_channels != 1:
            raise NotSwappable(f"W_g, W_x and psi disagree on f_int ({f_int}, {wx.out_channels}, {psi.in_channels}) "
                               f"or psi does not map to one channel")
        if set(m._modules) != {"W_g", "W_x", "psi", "relu"}:
            raise NotSwappable(f"children {sorted(m._modules)} differ from W_g, W_x, psi, relu")

        def inputs(gen, dtype, device):
            return (randn(gen, dtype, device, 2, wg.in_channels, 6, 5),
                    randn(gen, dtype, device, 2, wx.in_channels, 6, 5))

        return Spec((2, f_int, wg.in_channels, wx.in_channels), [Candidate({})], inputs)
