"""Attention pooling with a linear score in plain PyTorch (any dtype; the tests run it in float64).

``attention_pool_reference`` is the op's maths written out; ``LinearAttentionBlock`` is Learn to Pay Attention's
``LinearAttentionBlock`` (SaoYan/LearnToPayAttention ``blocks.py``) as written there: ``op`` a bias-free 1x1
convolution to one channel, ``forward(l, g) -> (c, pooled)``. ``GlobalContext`` is timm's (GCNet) as written in
``timm.layers.global_context``, pooling the same way (``conv_attn`` with a bias, softmax, sum) before its channel
MLPs; ``GlobalContextPool`` is that pooling alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_pool_reference(l, weight, bias=None, g=None, *, normalize="softmax", reduce="sum"):
    """``c = conv1x1(l + g, weight, bias)`` (B, 1, H, W); ``a = softmax_hw(c)`` or ``sigmoid(c)``;
    ``pooled = sum_hw(a * l)`` or its mean (B, C). Returns ``(c, pooled)``."""
    n, ch, h, w = l.shape
    c = F.conv2d(l if g is None else l + g, weight.reshape(1, ch, 1, 1), bias)
    a = F.softmax(c.view(n, 1, -1), dim=2).view(n, 1, h, w) if normalize == "softmax" else torch.sigmoid(c)
    f = (a * l).view(n, ch, -1)
    return c, (f.sum(2) if reduce == "sum" else f.mean(2))


class LinearAttentionBlock(nn.Module):
    """Learn to Pay Attention's ``LinearAttentionBlock``: ``c = op(l + g)``; softmax over H*W and a weighted sum
    (``normalize_attn=True``) or sigmoid and an average; returns ``(c, pooled)``."""

    def __init__(self, in_features: int, normalize_attn: bool = True):
        super().__init__()
        self.normalize_attn = normalize_attn
        self.op = nn.Conv2d(in_channels=in_features, out_channels=1, kernel_size=1, padding=0, bias=False)

    def forward(self, l, g):
        N, C, W, H = l.size()
        c = self.op(l + g)
        if self.normalize_attn:
            a = F.softmax(c.view(N, 1, -1), dim=2).view(N, 1, W, H)
        else:
            a = torch.sigmoid(c)
        g = torch.mul(a.expand_as(l), l)
        if self.normalize_attn:
            g = g.view(N, C, -1).sum(dim=2)
        else:
            g = F.adaptive_avg_pool2d(g, (1, 1)).view(N, C)
        return c.view(N, 1, W, H), g


def _softmax_context(x, conv_attn):
    """timm's GlobalContext pooling: ``sum_hw(softmax_hw(conv_attn(x)) * x)`` as (B, C, 1, 1)."""
    B, C, H, W = x.shape
    attn = F.softmax(conv_attn(x).reshape(B, 1, H * W), dim=-1).unsqueeze(3)
    return (x.reshape(B, C, H * W).unsqueeze(1) @ attn).view(B, C, 1, 1)


class GlobalContextPool(nn.Module):
    """GCNet's attention pooling: ``conv_attn`` (C -> 1, 1x1, bias), softmax over H*W, weighted sum of ``x``;
    ``forward(x) -> context`` (B, C, 1, 1)."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=bias)

    def forward(self, x):
        return _softmax_context(x, self.conv_attn)


class GlobalContext(nn.Module):
    """timm's ``GlobalContext`` (``timm.layers.global_context``; GCNet): same constructor, children (``conv_attn``,
    ``mlp_add``, ``mlp_scale``, ``gate``) and forward. Its constructor builds timm's ``ConvMlp``/``LayerNorm2d``
    (timm required); ``from_modules`` wraps existing children without importing timm."""

    def __init__(self, channels: int, use_attn: bool = True, fuse_add: bool = False, fuse_scale: bool = True,
                 init_last_zero: bool = False, rd_ratio: float = 1. / 8, rd_channels: int | None = None,
                 rd_divisor: int = 1, act_layer=nn.ReLU, gate_layer="sigmoid", device=None, dtype=None):
        super().__init__()
        try:
            from timm.layers.create_act import create_act_layer, get_act_layer
            from timm.layers.helpers import make_divisible
            from timm.layers.mlp import ConvMlp
            from timm.layers.norm import LayerNorm2d
        except ImportError:
            raise ImportError("GlobalContext builds timm's ConvMlp: pip install timm (or GlobalContext.from_modules "
                              "with existing children)") from None
        dd = {"device": device, "dtype": dtype}
        act_layer = get_act_layer(act_layer)
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=True, **dd) if use_attn else None
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        # timm's ConvMlp takes device/dtype only from timm 1.0.2x on: built as timm builds them, then moved
        self.mlp_add = (ConvMlp(channels, rd_channels, act_layer=act_layer, norm_layer=LayerNorm2d).to(**dd)
                        if fuse_add else None)
        self.mlp_scale = (ConvMlp(channels, rd_channels, act_layer=act_layer, norm_layer=LayerNorm2d).to(**dd)
                          if fuse_scale else None)
        self.gate = create_act_layer(gate_layer)
        self.init_last_zero = init_last_zero
        self.reset_parameters()

    @classmethod
    def from_modules(cls, conv_attn, mlp_add, mlp_scale, gate, init_last_zero: bool = False):
        """A GlobalContext holding these modules themselves (nothing copied; timm not imported)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv_attn, self.mlp_add, self.mlp_scale, self.gate = conv_attn, mlp_add, mlp_scale, gate
        self.init_last_zero = init_last_zero
        return self

    def reset_parameters(self):
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        if self.mlp_add is not None:
            nn.init.zeros_(self.mlp_add.fc2.weight)

    def _context(self, x):
        """The pooled context (B, C, 1, 1): the softmax attention pooling, or the mean without ``conv_attn``."""
        if self.conv_attn is not None:
            return _softmax_context(x, self.conv_attn)
        return x.mean(dim=(2, 3), keepdim=True)

    def forward(self, x):
        context = self._context(x)
        if self.mlp_scale is not None:
            x = x * self.gate(self.mlp_scale(context))
        if self.mlp_add is not None:
            x = x + self.mlp_add(context)
        return x
