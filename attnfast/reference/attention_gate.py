"""Attention gates ("Attention U-Net", Oktay et al. 2018) in plain PyTorch: the ground truth of
``attnfast::attention_gate``.

- ``AttentionBlock``: MONAI's ``monai.networks.nets.attentionunet.AttentionBlock`` (2-D), same module tree
  (``W_g.0.conv``, ``W_g.1``, ``W_x.0.conv``, ``W_x.1``, ``psi.0.conv``, ``psi.1``, ``psi.2``) so state dicts
  load both ways: ``x * sigmoid(BN(psi(relu(BN(W_g g) + BN(W_x x)))))``.
- ``GridAttentionBlock2D``: Attention-Gated-Networks' ``GridAttentionBlock2D`` (``_GridAttentionBlockND``,
  modes 'concatenation', 'concatenation_sigmoid' (the same maths) and 'concatenation_softmax'): ``theta``
  (k x k conv, stride k, no bias), ``phi`` (1x1 conv of g, bilinearly resized to theta's grid), ``psi``,
  sigmoid or softmax over space, the map resized to x, ``W(map * x)`` (conv + BatchNorm); returns
  ``(W_y, map)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_module_inputs, check_tensor

AGN_MODES = ("concatenation", "concatenation_sigmoid", "concatenation_softmax")


class ConvOnly(nn.Module):
    """MONAI's ``Convolution(..., conv_only=True)`` layout: the convolution is the child ``conv``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        return self.conv(x)


class AttentionBlock(nn.Module):
    """MONAI's Attention U-Net gate, 2-D: ``forward(g, x) -> x * psi``."""

    def __init__(self, spatial_dims: int, f_int: int, f_g: int, f_l: int, dropout=0.0):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"attnfast's AttentionBlock is 2-D (spatial_dims=2); got spatial_dims={spatial_dims}")
        self.f_int, self.f_g, self.f_l = f_int, f_g, f_l
        self.W_g = nn.Sequential(ConvOnly(f_g, f_int), nn.BatchNorm2d(f_int))
        self.W_x = nn.Sequential(ConvOnly(f_l, f_int), nn.BatchNorm2d(f_int))
        self.psi = nn.Sequential(ConvOnly(f_int, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU()

    def check_inputs(self, g, x) -> None:
        check_tensor(g, "g", ndim=4, channels=self.f_g)
        check_tensor(x, "x", ndim=4, channels=self.f_l)
        check_module_inputs({"g": g, "x": x}, self.W_x[0].conv.weight, "W_x.0.conv.weight")
        if g.shape[0] != x.shape[0] or g.shape[2:] != x.shape[2:]:
            raise ValueError(f"g and x must have the same batch size and H x W; got g {tuple(g.shape)}, "
                             f"x {tuple(x.shape)}")

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.check_inputs(g, x)
        return x * self.psi(self.relu(self.W_g(g) + self.W_x(x)))


class GridAttentionBlock2D(nn.Module):
    """Attention-Gated-Networks' 2-D grid attention gate: ``forward(x, g) -> (W_y, map)``."""

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: int | None = None,
                 mode: str = "concatenation", sub_sample_factor=(2, 2)):
        super().__init__()
        if mode not in AGN_MODES:
            raise ValueError(f"mode must be one of {', '.join(AGN_MODES)}; got {mode!r}")
        sf = tuple(sub_sample_factor) if isinstance(sub_sample_factor, (tuple, list)) else (sub_sample_factor,) * 2
        if len(sf) != 2 or sf[0] != sf[1] or int(sf[0]) != sf[0] or sf[0] < 1:
            raise ValueError(f"sub_sample_factor must be one positive integer k or (k, k); got {sub_sample_factor!r}")
        self.mode = mode
        self.dimension = 2
        self.sub_sample_factor = sf
        self.sub_sample_kernel_size = sf
        self.in_channels = in_channels
        self.gating_channels = gating_channels
        self.inter_channels = inter_channels if inter_channels is not None else max(in_channels // 2, 1)
        self.upsample_mode = "bilinear"
        self.W = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.BatchNorm2d(in_channels))
        self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=sf, stride=sf, padding=0, bias=False)
        self.phi = nn.Conv2d(gating_channels, self.inter_channels, 1, bias=True)
        self.psi = nn.Conv2d(self.inter_channels, 1, 1, bias=True)

    def check_inputs(self, x, g) -> None:
        check_tensor(x, "x", ndim=4, channels=self.in_channels)
        check_tensor(g, "g", ndim=4, channels=self.gating_channels)
        check_module_inputs({"x": x, "g": g}, self.theta.weight, "theta.weight")
        k = self.sub_sample_factor[0]
        if x.shape[0] != g.shape[0] or x.shape[2] < k or x.shape[3] < k or 0 in g.shape[2:]:
            raise ValueError(f"x and g must share the batch size, x must be at least {k}x{k} and g non-empty; "
                             f"got x {tuple(x.shape)}, g {tuple(g.shape)}")

    def attention_map(self, psi_f: torch.Tensor) -> torch.Tensor:
        """sigmoid, or softmax over the sub-sampled grid ('concatenation_softmax')."""
        if self.mode == "concatenation_softmax":
            n = psi_f.shape[0]
            return F.softmax(psi_f.view(n, 1, -1), dim=2).view(psi_f.shape)
        return torch.sigmoid(psi_f)

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        self.check_inputs(x, g)
        theta_x = self.theta(x)
        phi_g = F.interpolate(self.phi(g), size=theta_x.shape[2:], mode=self.upsample_mode, align_corners=False)
        f = F.relu(theta_x + phi_g)
        att = self.attention_map(self.psi(f))
        att = F.interpolate(att, size=x.shape[2:], mode=self.upsample_mode, align_corners=False)
        return self.W(att.expand_as(x) * x), att
