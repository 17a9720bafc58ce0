"""Grid attention ("Learn to Pay Attention", AttnMel) in plain PyTorch, as in the seeds.

Same math and parameter names as the tutorial's ``AttentionBlock`` so its checkpoints load:
``W_l`` and ``W_g`` are 1x1 convolutions without bias, ``phi`` a 1x1 convolution to one
channel with bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_module_inputs, check_tensor, check_up_factor


class GridAttention(nn.Module):
    """``a = softmax_hw(phi(relu(W_l l + up(W_g g))))``, ``pooled = sum_hw(a * l)``.

    With ``normalize_attn=False`` the map is a sigmoid and the pooling an average.

    Args:
        in_features_l: channels of the local feature map ``l``.
        in_features_g: channels of the global feature map ``g``.
        attn_features: channels of the intermediate (compatibility) space.
        up_factor: ``l`` is exactly ``up_factor`` times ``g`` in H and W; ``g``'s projection is
            upsampled bilinearly (align_corners=False). 1 means no upsampling.
        normalize_attn: softmax over H*W with sum pooling (True) or sigmoid with average pooling.
        return_logits: return the logits ``c = phi(...)`` (before the softmax/sigmoid) in place of
            ``a``, as Learn to Pay Attention's ``GridAttentionBlock`` does. Off by default (the seeds
            return ``a``).

    ``forward(l, g)`` returns ``(a, pooled)`` (or ``(c, pooled)``) with ``a``/``c`` of shape (B, 1, H, W)
    and ``pooled`` (B, C_l).
    """

    def __init__(self, in_features_l: int, in_features_g: int, attn_features: int, up_factor: int,
                 normalize_attn: bool = True, *, return_logits: bool = False):
        super().__init__()
        if int(up_factor) != up_factor or up_factor < 1:
            raise ValueError(f"up_factor must be a positive integer; got {up_factor!r}")
        self.in_features_l = in_features_l
        self.in_features_g = in_features_g
        self.attn_features = attn_features
        self.up_factor = int(up_factor)
        self.normalize_attn = normalize_attn
        if not isinstance(return_logits, bool):
            raise ValueError(f"return_logits must be a bool; got {return_logits!r}")
        self.return_logits = return_logits
        self.W_l = nn.Conv2d(in_features_l, attn_features, kernel_size=1, padding=0, bias=False)
        self.W_g = nn.Conv2d(in_features_g, attn_features, kernel_size=1, padding=0, bias=False)
        self.phi = nn.Conv2d(attn_features, 1, kernel_size=1, padding=0, bias=True)

    def extra_repr(self) -> str:
        extra = ", return_logits=True" if self.return_logits else ""
        return f"up_factor={self.up_factor}, normalize_attn={self.normalize_attn}{extra}"

    def check_inputs(self, l: torch.Tensor, g: torch.Tensor) -> None:
        check_tensor(l, "l", ndim=4, channels=self.in_features_l)
        check_tensor(g, "g", ndim=4, channels=self.in_features_g)
        check_module_inputs({"l": l, "g": g}, self.W_l.weight, "W_l.weight")
        check_up_factor(l.shape, g.shape, self.up_factor)

    def forward(self, l: torch.Tensor, g: torch.Tensor):
        self.check_inputs(l, g)
        n, c, h, w = l.shape
        l_ = self.W_l(l)
        g_ = self.W_g(g)
        if self.up_factor > 1:
            g_ = F.interpolate(g_, scale_factor=self.up_factor, mode="bilinear", align_corners=False)
        c_ = self.phi(F.relu(l_ + g_))  # (B, 1, H, W)
        if self.normalize_attn:
            a = F.softmax(c_.view(n, 1, -1), dim=2).view(n, 1, h, w)
        else:
            a = torch.sigmoid(c_)
        f = torch.mul(a.expand_as(l), l)
        if self.normalize_attn:
            pooled = f.view(n, c, -1).sum(dim=2)
        else:
            pooled = F.adaptive_avg_pool2d(f, (1, 1)).view(n, c)
        return (c_ if self.return_logits else a), pooled
