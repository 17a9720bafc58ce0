"""CBAM channel + spatial gates (Woo et al., 2018) and timm's light variant, plain PyTorch.

Arguments and parameter names follow timm's ``CbamModule`` (``channel.fc1``, ``channel.fc2``,
``spatial.conv.conv``, ``spatial.conv.bn``) so timm checkpoints of the block load.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_module_inputs, check_tensor


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ChannelAttn(nn.Module):
    """``x * sigmoid(mlp(avgpool(x)) + mlp(maxpool(x)))`` over channels."""

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, act_layer=nn.ReLU, mlp_bias: bool = False):
        super().__init__()
        if not rd_channels:
            rd_channels = _make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias)
        self.act = act_layer(inplace=True) if act_layer is nn.ReLU else act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias)

    def forward(self, x):
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * torch.sigmoid(x_avg + x_max)


class _ConvNorm(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        return self.bn(self.conv(x))


class SpatialAttn(nn.Module):
    """``x * sigmoid(bn(conv([mean_c(x), max_c(x)])))`` over positions."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = _ConvNorm(2, 1, kernel_size)

    def forward(self, x):
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(x_attn))


class CBAM(nn.Module):
    """Channel gate then spatial gate; same arguments as timm's ``CbamModule``."""

    channel_attn = ChannelAttn
    spatial_attn = SpatialAttn

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, spatial_kernel_size: int = 7, act_layer=nn.ReLU,
                 mlp_bias: bool = False):
        super().__init__()
        self.channels = channels
        self.channel = self.channel_attn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                         rd_divisor=rd_divisor, act_layer=act_layer, mlp_bias=mlp_bias)
        self.spatial = self.spatial_attn(spatial_kernel_size)

    def forward(self, x):
        check_tensor(x, "x", ndim=4, channels=self.channels)
        check_module_inputs({"x": x}, self.channel.fc1.weight, "channel.fc1.weight")
        return self.spatial(self.channel(x))


class LightChannelAttn(ChannelAttn):
    """``x * sigmoid(mlp(avgpool(x) / 2 + maxpool(x) / 2))``: timm's ``LightChannelAttn``."""

    def forward(self, x):
        x_pool = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x_pool))))


class LightSpatialAttn(nn.Module):
    """``x * sigmoid(bn(conv(mean_c(x) / 2 + max_c(x) / 2)))``: timm's ``LightSpatialAttn``."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = _ConvNorm(1, 1, kernel_size)

    def forward(self, x):
        x_attn = 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)
        return x * torch.sigmoid(self.conv(x_attn))


class LightCBAM(CBAM):
    """Light channel gate then light spatial gate; same arguments as timm's ``LightCbamModule``."""

    channel_attn = LightChannelAttn
    spatial_attn = LightSpatialAttn
