"""Modules over the fused ``attnfast::attention_pool`` op (attention pooling with a linear score).

- ``LinearAttentionBlock``: drop-in for Learn to Pay Attention's ``LinearAttentionBlock`` (same constructor,
  parameter ``op.weight``, ``forward(l, g) -> (c, pooled)``), so state dicts load both ways.
- ``GlobalContextPool``: the softmax-pooled context of GCNet, ``conv_attn`` (1x1 to one channel, with a bias):
  ``forward(x) -> context`` (B, C, 1, 1).
- ``GlobalContext``: drop-in for timm's ``GlobalContext`` (``attn_layer='gc'``): same constructor and children
  (``conv_attn``, ``mlp_add``, ``mlp_scale``, ``gate``); the context comes from the fused op, the channel MLPs
  and the gate stay timm's modules. Building it needs timm (its ``ConvMlp``/``LayerNorm2d``);
  ``GlobalContext.from_modules`` wraps existing children without importing timm (what ``attnfast.swap`` does).

Under autocast, inputs and the score weight are cast to the autocast dtype, as eager's 1x1 convolution casts
them (the op accumulates in fp32); the outputs come back in the dtypes eager gives there.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import autocast_dtype, check_module_inputs, check_tensor
from ..ops.attention_pool import attention_pool
from ..reference.attention_pool import LinearAttentionBlock as _Reference


def _amp_cast(x, *tensors):
    """(autocast dtype or None, tensors cast to it)."""
    amp = autocast_dtype(x.device.type)
    if amp is None:
        return None, tensors
    return amp, tuple(t if t is None else t.to(amp) for t in tensors)


class LinearAttentionBlock(_Reference):
    """Fused ``LinearAttentionBlock`` (Triton on CUDA, a PyTorch path saving only the logits on CPU).

    ``g``: the global feature (B, C, 1, 1) as Learn to Pay Attention's models pass it, or a map like ``l``."""

    def forward(self, l, g):
        check_tensor(l, "l", ndim=4, channels=self.op.in_channels)
        check_tensor(g, "g", ndim=4, channels=self.op.in_channels)
        check_module_inputs({"l": l, "g": g}, self.op.weight, "op.weight")
        amp, (l2, g2, w, b) = _amp_cast(l, l, g, self.op.weight, self.op.bias)
        norm, red = ("softmax", "sum") if self.normalize_attn else ("sigmoid", "mean")
        c, pooled = attention_pool(l2, w, b, g2, normalize=norm, reduce=red)
        if amp is not None:  # eager: a (fp32 softmax / amp sigmoid) times l promotes
            pooled = pooled.to(torch.promote_types(torch.float32 if self.normalize_attn else amp, l.dtype))
        return c, pooled


def context_pool(x: torch.Tensor, conv_attn: nn.Conv2d) -> torch.Tensor:
    """``sum_hw(softmax_hw(conv_attn(x)) * x)`` as (B, C, 1, 1), fused; eager's dtype under autocast (the
    product is a matmul there: the autocast dtype)."""
    check_tensor(x, "x", ndim=4, channels=conv_attn.in_channels)
    check_module_inputs({"x": x}, conv_attn.weight, "conv_attn.weight")
    _, (x2, w, b) = _amp_cast(x, x, conv_attn.weight, conv_attn.bias)
    _, pooled = attention_pool(x2, w, b, normalize="softmax", reduce="sum")
    return pooled.view(x.shape[0], x.shape[1], 1, 1)


class GlobalContextPool(nn.Module):
    """GCNet's attention pooling: ``conv_attn`` (C -> 1, 1x1, bias), softmax over H*W, weighted sum of ``x``."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=bias)

    def forward(self, x):
        return context_pool(x, self.conv_attn)


class GlobalContext(nn.Module):
    """timm's ``GlobalContext`` with the attention pooling fused (same constructor, children and state dict)."""

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
            raise ImportError("attnfast.nn.GlobalContext builds timm's ConvMlp: pip install timm (or "
                              "GlobalContext.from_modules with existing children)") from None
        dd = {"device": device, "dtype": dtype}
        act_layer = get_act_layer(act_layer)
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=True, **dd) if use_attn else None
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.mlp_add = (ConvMlp(channels, rd_channels, act_layer=act_layer, norm_layer=LayerNorm2d, **dd)
                        if fuse_add else None)
        self.mlp_scale = (ConvMlp(channels, rd_channels, act_layer=act_layer, norm_layer=LayerNorm2d, **dd)
                          if fuse_scale else None)
        self.gate = create_act_layer(gate_layer)
        self.init_last_zero = init_last_zero
        self.reset_parameters()

    @classmethod
    def from_modules(cls, conv_attn, mlp_add, mlp_scale, gate, init_last_zero: bool = False) -> "GlobalContext":
        """A fused GlobalContext holding these modules themselves (nothing copied; timm not imported)."""
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

    def forward(self, x):
        if self.conv_attn is not None:
            context = context_pool(x, self.conv_attn)
        else:
            context = x.mean(dim=(2, 3), keepdim=True)
        if self.mlp_scale is not None:
            x = x * self.gate(self.mlp_scale(context))
        if self.mlp_add is not None:
            x = x + self.mlp_add(context)
        return x
