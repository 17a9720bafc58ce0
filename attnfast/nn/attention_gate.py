"""Attention U-Net gates whose F_int x H x W intermediate never exists: drop-ins for MONAI's ``AttentionBlock``
and Attention-Gated-Networks' ``GridAttentionBlock2D`` (``attnfast.reference.attention_gate``'s modules: same
constructors, module trees and parameter names, so state dicts load both ways).

Both run ``attnfast.ops.attention_gate``: the fused logits op (``theta``/``W_x``, ``phi``/``W_g``, relu and
``psi`` in one kernel), one-channel map maths in PyTorch, and the fused gating product.

MONAI's BatchNorms after ``W_x`` and ``W_g`` are folded into the op's weights (``fold_batch_norm``): in
training mode with the batch statistics of the projections, obtained from the inputs' channel means and
covariances (``channel_moments``, ``projection_stats``), and the running statistics updated as
``nn.BatchNorm2d`` updates them (momentum, or the cumulative average for ``momentum=None``; unbiased variance;
``num_batches_tracked``); in eval mode with the running statistics. ``psi``'s BatchNorm (one channel) and
sigmoid run as the modules themselves on the logits. AGN's ``W`` (conv + BatchNorm on the gated x) is the
module's own ``W``.

Checks (``docs/adding-an-op.md``): the logits op validates x, g and the weights it is given (the AGN module
checks nothing itself); the MONAI module checks g and x first, as it reads their moments before the op.

Under autocast, x and g enter the logits op in the autocast dtype (as the eager convolutions would take
them); the op accumulates in fp32. The map and the output come back in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import autocast_dtype
from ..ops.attention_gate import (attention_gate_logits, channel_moments, fold_batch_norm, gate_op,
                                  projection_stats)
from ..reference.attention_gate import AttentionBlock as _RefAttentionBlock
from ..reference.attention_gate import GridAttentionBlock2D as _RefGridAttentionBlock2D


def _amp(x, g):
    amp = autocast_dtype(x.device.type)
    return (x, g) if amp is None else (x.to(amp), g.to(amp))


def _zeros_if_none(b, like: torch.Tensor, n: int) -> torch.Tensor:
    return b if b is not None else like.new_zeros(n)


def batch_norm_statistics(bn, v: torch.Tensor, w: torch.Tensor, b):
    """(mean, var) that ``bn`` normalizes ``w v + b`` with (w: 1x1 conv weight), updating its running
    statistics in training mode exactly as ``nn.BatchNorm2d.forward`` does."""
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if not (bn.training or (bn.running_mean is None and bn.running_var is None)):
        return bn.running_mean, bn.running_var
    n = v.numel() // v.shape[1]
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[v.shape[0], w.shape[0], *v.shape[2:]]}")
    mean, var = projection_stats(w, b, channel_moments(v))
    stats = mean, var
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            # eager's statistics of a channel holding a non-finite value: the variance is NaN, the mean +-inf, or
            # NaN where +inf and -inf meet (an infinite weight times inputs of both signs); the folded
            # ``w m + b`` and ``w S w^T`` follow that with these NaN terms
            mean = mean + 0.0 * w.reshape(w.shape[0], -1).to(mean.dtype).abs().sum(1)
            var = var * (n / (n - 1)) + 0.0 * mean
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.to(bn.running_var.dtype), alpha=factor)
    return stats


def fold_conv_bn(conv, bn, v: torch.Tensor):
    """(weight, bias) of ``bn(conv(v))`` as one 1x1 convolution, for this call (batch statistics in training)."""
    mean, var = batch_norm_statistics(bn, v, conv.weight, conv.bias)
    return fold_batch_norm(conv.weight, conv.bias, mean, var, bn.weight, bn.bias, bn.eps)


class AttentionBlock(_RefAttentionBlock):
    """MONAI's ``AttentionBlock`` (2-D), fused: ``forward(g, x) -> x * psi``."""

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.check_inputs(g, x)
        wg, bg = fold_conv_bn(self.W_g[0].conv, self.W_g[1], g)
        wx, bx = fold_conv_bn(self.W_x[0].conv, self.W_x[1], x)
        conv = self.psi[0].conv
        xk, gk = _amp(x, g)
        logits = attention_gate_logits(xk, gk, wx, wg, bx + bg, conv.weight,
                                       _zeros_if_none(conv.bias, conv.weight, 1), 1)
        bn = self.psi[1]
        if bn.weight is not None:
            logits = logits.to(bn.weight.dtype)
        att = self.psi[2](bn(logits))
        return gate_op(x, att.to(x.dtype))


class GridAttentionBlock2D(_RefGridAttentionBlock2D):
    """Attention-Gated-Networks' ``GridAttentionBlock2D``, fused: ``forward(x, g) -> (W_y, map)``."""

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        fi = self.theta.weight.shape[0]
        bias = _zeros_if_none(self.phi.bias, self.phi.weight, fi)
        if self.theta.bias is not None:
            bias = bias + self.theta.bias
        xk, gk = _amp(x, g)
        logits = attention_gate_logits(xk, gk, self.theta.weight, self.phi.weight, bias, self.psi.weight,
                                       _zeros_if_none(self.psi.bias, self.psi.weight, 1), self.sub_sample_factor[0])
        att = self.attention_map(logits)
        if att.shape[2:] != x.shape[2:]:
            att = F.interpolate(att, size=x.shape[2:], mode=self.upsample_mode, align_corners=False)
        att = att.to(x.dtype)
        return self.W(gate_op(x, att)), att
