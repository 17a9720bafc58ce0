"""Residual Attention Network building blocks (Wang et al., 2017; seed 004), plain PyTorch.

``ResidualAttentionModule`` = ``p`` pre-processing residual units, a trunk of ``t`` units, and a
bottom-up/top-down soft-mask branch of encoder depth 1-3, combined as ``(1 + M) * T`` where
``M = sigmoid(mask_logits)``, then ``p`` post-processing units. The mask is upsampled to the
skip's actual size at every level, so any input size works (no fixed 224 sizes).

Seed 004's article text and the RAN paper are followed where its Keras listing differs:

- mask upsampling is bilinear ("a linear interpolation up samples the output"), not ``UpSampling2D``'s
  nearest neighbour, and pooling is 3x3/2 (the paper's Caffe model) rather than 2x2;
- the mask head is pre-activated (BN-ReLU-1x1, BN-ReLU-1x1, then the sigmoid in the gate), and the
  residual units' projection shortcut takes the pre-activated input, as in pre-activation ResNets;
  the listing has plain conv, conv, sigmoid and a shortcut on the raw input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_module_inputs, check_tensor


class ResidualUnit(nn.Module):
    """Full pre-activation bottleneck unit (He et al., 2016): BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1."""

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1):
        super().__init__()
        out_channels = out_channels or in_channels
        mid = max(out_channels // 4, 1)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        identity = x if self.shortcut is None else self.shortcut(pre)
        return out + identity


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualUnit(channels) for _ in range(n)])


def residual_gate_reference(mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """Attention residual learning: ``(1 + sigmoid(mask_logits)) * trunk``."""
    return (1 + torch.sigmoid(mask_logits)) * trunk


class ResidualAttentionModule(nn.Module):
    """Trunk + soft-mask attention module with output ``(1 + M) * T``.

    Args:
        channels: input and output channels (the seed keeps them equal).
        encoder_depth: number of max-pool levels in the mask branch, 1 to 3
            (stage 1 of RAN uses 3, stage 2 uses 2, stage 3 uses 1).
        p, t, r: pre/post units, trunk units, and units between pooling levels ({1, 2, 1} in the paper).
    """

    def __init__(self, channels: int, encoder_depth: int = 1, p: int = 1, t: int = 2, r: int = 1):
        super().__init__()
        if encoder_depth not in (1, 2, 3):
            raise ValueError(f"encoder_depth must be 1, 2 or 3; got {encoder_depth!r}")
        self.channels = channels
        self.encoder_depth = encoder_depth
        self.first = _units(channels, p)
        self.trunk = _units(channels, t)
        # Mask encoder: level 0 pools the input; each later level pools again.
        self.down = nn.ModuleList([_units(channels, r) for _ in range(encoder_depth)])
        self.skips = nn.ModuleList([ResidualUnit(channels) for _ in range(encoder_depth - 1)])
        self.bottom = _units(channels, r)  # the extra units at the coarsest level
        self.up = nn.ModuleList([_units(channels, r) for _ in range(encoder_depth - 1)])
        self.mask_head = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.last = _units(channels, p)

    def gate(self, mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """``(1 + sigmoid(mask_logits)) * trunk``; the fused module overrides this with the Triton op."""
        return residual_gate_reference(mask_logits, trunk)

    def mask_logits(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        m = x
        skips = []
        for level in range(self.encoder_depth):
            sizes.append(m.shape[-2:])
            m = F.max_pool2d(m, kernel_size=3, stride=2, padding=1)
            m = self.down[level](m)
            if level < self.encoder_depth - 1:
                skips.append(self.skips[level](m))
        m = self.bottom(m)
        for level in reversed(range(self.encoder_depth - 1)):
            m = F.interpolate(m, size=skips[level].shape[-2:], mode="bilinear", align_corners=False)
            m = self.up[level](m + skips[level])
        m = F.interpolate(m, size=sizes[0], mode="bilinear", align_corners=False)
        return self.mask_head(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", ndim=4, channels=self.channels)
        check_module_inputs({"x": x}, self.mask_head[2].weight, "mask_head.2.weight")
        x = self.first(x)
        trunk = self.trunk(x)
        out = self.gate(self.mask_logits(x), trunk)
        return self.last(out)
