"""Residual Attention Network (Wang et al., 2017; seed 004): Attention-56 and Attention-92.

Stem (7x7/2 conv, 3x3/2 max-pool), then three stages of residual unit + attention modules with
mask encoder depths 3, 2, 1, then three residual units at 1/32 and a classifier. Attention-56
has 1-1-1 attention modules per stage and Attention-92 has 1-2-3. Global pooling is adaptive,
so any input >= 64 whose sides are multiples of 32 works, and any ``num_classes``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_tensor
from ._select import attention_class
from ..reference.residual_attention import ResidualUnit

MODULES_PER_STAGE = {56: (1, 1, 1), 92: (1, 2, 3)}


class ResidualAttentionNet(nn.Module):
    """``ResidualAttentionNet(depth=56|92, num_classes)``; ``width`` is the stem width (64 in the paper)."""

    def __init__(self, depth: int = 56, num_classes: int = 1000, width: int = 64, in_channels: int = 3,
                 attention: str = "reference", dropout: float | None = None):
        super().__init__()
        if depth not in MODULES_PER_STAGE:
            raise ValueError(f"depth must be 56 or 92; got {depth!r}")
        self.in_channels = in_channels
        Attn = attention_class(attention, "ResidualAttentionModule")
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        n1, n2, n3 = MODULES_PER_STAGE[depth]
        self.stage1 = nn.Sequential(ResidualUnit(w, 4 * w), *[Attn(4 * w, encoder_depth=3) for _ in range(n1)])
        self.stage2 = nn.Sequential(ResidualUnit(4 * w, 8 * w, stride=2),
                                    *[Attn(8 * w, encoder_depth=2) for _ in range(n2)])
        self.stage3 = nn.Sequential(ResidualUnit(8 * w, 16 * w, stride=2),
                                    *[Attn(16 * w, encoder_depth=1) for _ in range(n3)])
        self.stage4 = nn.Sequential(ResidualUnit(16 * w, 32 * w, stride=2), ResidualUnit(32 * w),
                                    ResidualUnit(32 * w))
        self.head_norm = nn.BatchNorm2d(32 * w)
        self.dpt = nn.Dropout(dropout) if dropout else None
        self.fc = nn.Linear(32 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", ndim=4, channels=self.in_channels)
        h, w = x.shape[-2:]
        if h < 64 or w < 64 or h % 32 or w % 32:
            raise ValueError(f"ResidualAttentionNet input sides must be multiples of 32 and at least 64; "
                             f"got {h}x{w}")
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.head_norm(x)), 1).flatten(1)
        if self.dpt is not None:
            x = self.dpt(x)
        return self.fc(x)


def ran56(num_classes: int = 1000, attention: str = "reference", **kwargs) -> ResidualAttentionNet:
    return ResidualAttentionNet(56, num_classes, attention=attention, **kwargs)


def ran92(num_classes: int = 1000, attention: str = "reference", **kwargs) -> ResidualAttentionNet:
    return ResidualAttentionNet(92, num_classes, attention=attention, **kwargs)
