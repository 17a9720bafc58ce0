"""Modules over the fused ``attnfast::attention_pool`` op (attention pooling with a linear score), each a subclass
of its reference (``attnfast.reference.attention_pool``) overriding only ``forward`` / ``_context``:

- ``LinearAttentionBlock``: drop-in for Learn to Pay Attention's ``LinearAttentionBlock`` (constructor, ``op.weight``,
  ``forward(l, g) -> (c, pooled)``); ``g`` the global feature (B, C, 1, 1) as LTPA's models pass it, or a map like l.
- ``GlobalContextPool``: GCNet's softmax-pooled context, ``forward(x) -> context`` (B, C, 1, 1).
- ``GlobalContext``: drop-in for timm's ``GlobalContext`` (``attn_layer='gc'``): same constructor, children and state
  dict; the context comes from the fused op, the channel MLPs and the gate stay timm's modules.

The op validates the tensors it gets. Under autocast, inputs and the score weight are cast to the autocast dtype as
eager's 1x1 convolution casts them (the op accumulates in fp32); the outputs come back in eager's dtypes.
"""
from __future__ import annotations

import torch

from .._dispatch import autocast_dtype
from ..ops.attention_pool import attention_pool
from ..reference import attention_pool as reference


def _amp_cast(x, *tensors):
    """(autocast dtype or None, tensors cast to it)."""
    amp = autocast_dtype(x.device.type)
    if amp is None:
        return None, tensors
    return amp, tuple(t if t is None else t.to(amp) for t in tensors)


class LinearAttentionBlock(reference.LinearAttentionBlock):
    """Fused ``LinearAttentionBlock`` (Triton on CUDA, a PyTorch path saving only the logits on CPU)."""

    def forward(self, l, g):
        amp, (l2, g2, w, b) = _amp_cast(l, l, g, self.op.weight, self.op.bias)
        norm, red = ("softmax", "sum") if self.normalize_attn else ("sigmoid", "mean")
        c, pooled = attention_pool(l2, w, b, g2, normalize=norm, reduce=red)
        if amp is not None:  # eager: a (fp32 softmax / amp sigmoid) times l promotes
            pooled = pooled.to(torch.promote_types(torch.float32 if self.normalize_attn else amp, l.dtype))
        return c, pooled


def context_pool(x: torch.Tensor, conv_attn) -> torch.Tensor:
    """``sum_hw(softmax_hw(conv_attn(x)) * x)`` as (B, C, 1, 1), fused (eager's dtype under autocast: a matmul)."""
    _, (x2, w, b) = _amp_cast(x, x, conv_attn.weight, conv_attn.bias)
    _, pooled = attention_pool(x2, w, b, normalize="softmax", reduce="sum")
    return pooled.view(x.shape[0], x.shape[1], 1, 1)


class GlobalContextPool(reference.GlobalContextPool):
    """Fused GCNet attention pooling."""

    def forward(self, x):
        return context_pool(x, self.conv_attn)


class GlobalContext(reference.GlobalContext):
    """timm's ``GlobalContext`` with the attention pooling fused."""

    def _context(self, x):
        if self.conv_attn is not None:
            return context_pool(x, self.conv_attn)
        return x.mean(dim=(2, 3), keepdim=True)
