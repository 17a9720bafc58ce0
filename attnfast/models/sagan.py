"""A small ResNet classifier with SAGAN self-attention on a high-resolution feature map.

The stem keeps the input resolution, so the attention runs on an H x W map (64 x 64 for a
64 x 64 image: N = 4096, the regime where the reference layer's N x N matrices dominate memory).
Then three strided stages halve the map (sides must be multiples of 8), global pooling and a
linear head. ``width`` sets the channels of the attention stage (stages: w, 2w, 4w, 8w), so it
trains on a CPU at small sizes.

``build(num_classes, attention="fused"|"reference", **kwargs)`` is what
``attnfast.models.create_model("sagan_resnet", ...)`` calls.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_tensor


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class _FirstOutput(nn.Module):
    """Keeps only ``out`` of a SAGAN layer returning ``(out, attention)``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y = self.layer(x)
        return y[0] if isinstance(y, tuple) else y


def self_attention_layer(channels: int, attention: str, **kwargs) -> nn.Module:
    if attention == "reference":
        if kwargs:
            raise ValueError(f"attention='reference' takes no self-attention options; got {sorted(kwargs)}")
        from ..reference.self_attention import SelfAttention
        return SelfAttention(channels)
    if attention == "fused":
        from ..nn.self_attention import SelfAttention2d
        return SelfAttention2d(channels, **kwargs)
    raise ValueError(f"attention must be 'reference' or 'fused'; got {attention!r}")


class SAGANResNet(nn.Module):
    """Stem (3x3, stride 1) + block, self-attention at full input resolution, 3 strided stages, head."""

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 3,
                 attention: str = "fused", attn_gamma: float = 0.0, **attn_kwargs):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int; got {width!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
        self.in_channels = in_channels
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True), BasicBlock(w, w))
        self.attn = _FirstOutput(self_attention_layer(w, attention, **attn_kwargs))
        with torch.no_grad():
            self.attn.layer.gamma.fill_(attn_gamma)
        self.stages = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2),
                                    BasicBlock(4 * w, 8 * w, 2))
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", ndim=4, channels=self.in_channels)
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"SAGANResNet input sides must be multiples of 8; got {h}x{w}")
        x = self.attn(self.stem(x))
        x = self.stages(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build(num_classes: int, attention: str = "fused", **kwargs) -> SAGANResNet:
    """``SAGANResNet(num_classes, attention=..., width=32, in_channels=3, attn_gamma=0.0, **attn_kwargs)``;
    ``attn_kwargs`` (pool, heads, value_dim, scale) go to ``SelfAttention2d`` (fused only)."""
    return SAGANResNet(num_classes, attention=attention, **kwargs)
