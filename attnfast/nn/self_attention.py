"""``SelfAttention2d``: SAGAN self-attention over ``attnfast::self_attention`` (no N x N matrix).

Drop-in for ``attnfast.reference.SelfAttention`` (the forum seed's layer), and a subclass of it:

- same constructor ``SelfAttention2d(in_dim, activation=None)`` and parameter names
  (``query_conv``, ``key_conv``, ``value_conv`` weight + bias, ``gamma``), so
  ``load_state_dict`` works both ways and the output equals the reference's ``out``;
- ``forward(x)`` returns ``(out, None)`` by default, so ``out, attn = layer(x)`` keeps working;
  the attention matrix is never built. Pass ``tuple_output=False`` to get ``out`` alone (for
  ``nn.Sequential``). To look at attention, use ``attention_maps(layer, x, queries)``
  (or ``layer.attention_maps(x, queries)``), O(len(queries) * N) memory.

Options beyond the seed (off by default; with any of them on, the module is no longer
state-dict-compatible with the reference only where it adds parameters):

- ``pool=True``: keys and values are 2x2 max-pooled (``ceil_mode``), N/4 keys, as in the
  official SAGAN/BigGAN attention;
- ``value_dim=c``: value conv to ``c`` channels and an ``out_conv`` 1x1 (c -> in_dim) after the
  attention (official SAGAN: ``value_dim=in_dim // 2``); the residual is then added outside the
  kernel;
- ``heads=h``: query/key and value channels split into ``h`` heads (each must divide);
- ``scale``: logit multiplier (SAGAN: 1.0, no 1/sqrt(d)).

``attnfast.swap`` turns a user's SAGAN layer into this module, picking ``tuple_output`` and ``scale``
by probing the layer; a layer that returned ``(out, attention)`` then returns ``(out, None)``.

Under autocast the attention runs in the convs' output dtype and the residual ``gamma * o + x`` in the
promoted dtype of ``o`` and ``x``, as the reference's ``self.gamma * out + x`` does (an fp32 ``x`` gives an
fp32 ``out``). Outside autocast, ``x`` must have the parameters' dtype and device (ValueError otherwise).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_tensor
from ..ops.self_attention import self_attention
from ..reference.self_attention import SelfAttention, qk_dim


class SelfAttention2d(SelfAttention):
    """``out = gamma * attention(x) + x`` with SAGAN's 1x1 query/key/value convs; see the module doc.

    The reference's constructor builds the seed's layers (its ``softmax`` child has no parameters and is
    never called here); ``value_dim`` replaces the value conv and adds ``out_conv``. ``check_inputs(x)`` is
    the reference's: ``x`` feeds the convolutions before the op sees q, k, v (which the op validates)."""

    def __init__(self, in_dim: int, activation=None, *, pool: bool = False, value_dim: int | None = None,
                 heads: int = 1, scale: float = 1.0, tuple_output: bool = True):
        if not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"in_dim must be a positive int; got {in_dim!r}")
        value_dim = in_dim if value_dim is None else value_dim
        if not isinstance(value_dim, int) or value_dim < 1:
            raise ValueError(f"value_dim must be a positive int; got {value_dim!r}")
        d = qk_dim(in_dim)
        if not isinstance(heads, int) or heads < 1 or d % heads or value_dim % heads:
            raise ValueError(f"heads must be a positive int dividing the query/key dim {d} and value_dim "
                             f"{value_dim}; got {heads!r}")
        super().__init__(in_dim, activation, scale=scale, tuple_output=tuple_output)
        self.pool = bool(pool)
        self.value_dim = value_dim
        self.heads = heads
        if value_dim != in_dim:
            self.value_conv = nn.Conv2d(in_dim, value_dim, kernel_size=1)
        self.out_conv = nn.Conv2d(value_dim, in_dim, kernel_size=1) if value_dim != in_dim else None

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, qk_dim={self.query_conv.out_channels}, value_dim={self.value_dim}, "
                f"pool={self.pool}, heads={self.heads}, scale={self.scale}")

    def _keys_values(self, x: torch.Tensor):
        k, v = self.key_conv(x), self.value_conv(x)
        if self.pool:
            k = F.max_pool2d(k, 2, ceil_mode=True)
            v = F.max_pool2d(v, 2, ceil_mode=True)
        return k, v

    def forward(self, x: torch.Tensor):
        self.check_inputs(x)
        b, c, h, w = x.shape
        n, hd = h * w, self.heads
        q = self.query_conv(x)
        k, v = self._keys_values(x)
        nk = k.shape[-2] * k.shape[-1]
        dt = q.dtype
        qh = q.reshape(b * hd, -1, n)
        kh = k.reshape(b * hd, -1, nk)
        vh = v.reshape(b * hd, -1, nk)
        if self.out_conv is None and x.dtype == dt and self.gamma.dtype == dt:
            xh = x.reshape(b * hd, -1, n)
            out = self_attention(qh, kh, vh, xh, self.gamma, self.scale).reshape(b, c, h, w)
        else:  # value_dim's out_conv, or autocast: the residual in the promoted dtype, as the reference
            o = self_attention(qh, kh, vh, scale=self.scale).reshape(b, self.value_dim, h, w)
            out = torch.addcmul(x, o if self.out_conv is None else self.out_conv(o), self.gamma)
        return (out, None) if self.tuple_output else out

    def attention_maps(self, x: torch.Tensor, queries) -> torch.Tensor:
        return attention_maps(self, x, queries)


def _query_index(queries, h: int, w: int, device) -> torch.Tensor:
    if isinstance(queries, torch.Tensor):
        if queries.dtype.is_floating_point or queries.dim() > 2:
            raise ValueError("queries must be integer flat indices (Q,) or (row, col) pairs (Q, 2)")
        idx = queries.to(device=device, dtype=torch.long)
        if idx.dim() == 2:
            if idx.shape[1] != 2:
                raise ValueError(f"queries as a 2-D tensor must be (Q, 2) (row, col); got {tuple(idx.shape)}")
            rows, cols = idx[:, 0], idx[:, 1]
            if ((rows < 0) | (rows >= h) | (cols < 0) | (cols >= w)).any():
                raise ValueError(f"query (row, col) out of range for a {h}x{w} map")
            idx = rows * w + cols
    else:
        if not isinstance(queries, Sequence) or len(queries) == 0:
            raise ValueError("queries must be a non-empty sequence of flat indices or (row, col) pairs")
        flat = []
        for qpos in queries:
            if isinstance(qpos, int):
                flat.append(qpos)
            elif isinstance(qpos, Sequence) and len(qpos) == 2 and all(isinstance(t, int) for t in qpos):
                r, cc = qpos
                if not (0 <= r < h and 0 <= cc < w):
                    raise ValueError(f"query (row, col)={tuple(qpos)} out of range for a {h}x{w} map")
                flat.append(r * w + cc)
            else:
                raise ValueError(f"each query must be an int flat index or a (row, col) pair; got {qpos!r}")
        idx = torch.tensor(flat, dtype=torch.long, device=device)
    if idx.numel() == 0:
        raise ValueError("queries must not be empty")
    if ((idx < 0) | (idx >= h * w)).any():
        raise ValueError(f"query flat indices must be in [0, {h * w}) for a {h}x{w} map")
    return idx


def attention_maps(layer: nn.Module, x: torch.Tensor, queries) -> torch.Tensor:
    """Attention of chosen query positions of a SAGAN layer, for visualization.

    ``layer``: a ``SelfAttention2d`` or a reference ``SelfAttention``; ``queries``: flat indices
    (``row * W + col``), (row, col) pairs, or a LongTensor (Q,) / (Q, 2). Returns the softmax rows
    as (B, Q, Hk, Wk) (Hk x Wk is the key map: H x W, or the pooled map with ``pool=True``), or
    (B, heads, Q, Hk, Wk) with several heads. Memory O(Q * N): only the chosen rows are computed.
    """
    check_tensor(x, "x", ndim=4, channels=layer.query_conv.in_channels)
    b, _, h, w = x.shape
    idx = _query_index(queries, h, w, x.device)
    hd = getattr(layer, "heads", 1)
    scale = getattr(layer, "scale", 1.0)
    with torch.no_grad():
        q = layer.query_conv(x).flatten(2)[:, :, idx]  # (B, D, Q)
        if getattr(layer, "pool", False):
            k = F.max_pool2d(layer.key_conv(x), 2, ceil_mode=True)
        else:
            k = layer.key_conv(x)
        hk, wk = k.shape[-2:]
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        qh = q.to(ct).reshape(b, hd, -1, idx.numel())
        kh = k.to(ct).reshape(b, hd, -1, hk * wk)
        attn = torch.softmax(scale * qh.transpose(-1, -2) @ kh, dim=-1)  # (B, heads, Q, NK)
        attn = attn.reshape(b, hd, idx.numel(), hk, wk).to(x.dtype)
    return attn[:, 0] if hd == 1 else attn
