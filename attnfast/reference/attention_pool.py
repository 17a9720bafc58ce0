"""Attention pooling with a linear score in plain PyTorch (any dtype; the tests run it in float64).

``attention_pool_reference`` is the op's maths written out; ``LinearAttentionBlock`` is Learn to Pay Attention's
``LinearAttentionBlock`` (SaoYan/LearnToPayAttention ``blocks.py``) as written there: ``op`` a bias-free 1x1
convolution to one channel, ``forward(l, g) -> (c, pooled)``. timm's ``GlobalContext`` pools the same way
(``conv_attn`` with a bias, softmax, sum).
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
