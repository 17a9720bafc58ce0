"""SAGAN self-attention on a feature map, as in the forum seed (plain PyTorch).

It stores the full (B, N, N) attention (N = H*W): the memory problem attnfast solves. Kept
exactly as the seed computes it so that it is the ground truth for the fused op.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_module_inputs, check_tensor


def qk_dim(in_dim: int) -> int:
    """Query/key width of the SAGAN layer: in_dim // 8, at least 1."""
    return max(in_dim // 8, 1)


class SelfAttention(nn.Module):
    """``out = gamma * (V softmax(Q^T K)^T) + x``; returns ``(out, attention)``.

    ``query_conv``/``key_conv`` map to ``max(in_dim // 8, 1)`` channels, ``value_conv`` to
    ``in_dim``, all 1x1 with bias. ``gamma`` starts at 0. No 1/sqrt(d) scale; the softmax runs
    over keys. ``attention`` has shape (B, N, N) with rows indexed by query position.

    ``activation`` is accepted (and ignored) for compatibility with the seed's signature.

    Options beyond the seed (the defaults are the seed): ``scale`` multiplies the logits (1/sqrt(d) in
    some users' copies); ``tuple_output=False`` returns ``out`` alone.
    """

    def __init__(self, in_dim: int, activation=None, *, scale: float = 1.0, tuple_output: bool = True):
        super().__init__()
        if not isinstance(tuple_output, bool):
            raise ValueError(f"tuple_output must be a bool; got {tuple_output!r}")
        self.scale = float(scale)
        self.tuple_output = tuple_output
        self.chanel_in = in_dim
        self.in_dim = in_dim
        self.activation = activation
        d = qk_dim(in_dim)
        self.query_conv = nn.Conv2d(in_dim, d, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, d, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def check_inputs(self, x: torch.Tensor) -> None:
        check_tensor(x, "x", ndim=4, channels=self.in_dim)
        check_module_inputs({"x": x}, self.query_conv.weight, "query_conv.weight")

    def forward(self, x: torch.Tensor):
        self.check_inputs(x)
        b, c, h, w = x.shape
        n = h * w
        proj_query = self.query_conv(x).view(b, -1, n).permute(0, 2, 1)  # B x N x d
        proj_key = self.key_conv(x).view(b, -1, n)  # B x d x N
        energy = torch.bmm(proj_query, proj_key)  # B x N x N
        if self.scale != 1.0:
            energy = energy * self.scale
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(b, -1, n)  # B x C x N
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(b, c, h, w)
        out = self.gamma * out + x
        return (out, attention) if self.tuple_output else out
