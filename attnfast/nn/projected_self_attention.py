"""``ProjectedSelfAttention2d``: self-attention around the caller's own projection modules.

Many self-attention layers differ from SAGAN's only in their projections: spectral-norm or parametrized 1x1
convolutions (BigGAN, SAGAN with ``spectral_norm``), bias-free convolutions, a value projection to fewer
channels followed by an output convolution (BigGAN's ``o``; timm ``NonLocalAttn``'s ``z`` + BatchNorm). This
module calls the layer's OWN query/key/value/output modules (so spectral norm, parametrizations, their power
iteration in train mode, hooks and any conv subclass keep working) and replaces only the N x N core,
``softmax(scale * q^T k)`` applied to ``v``, with ``attnfast.ops.self_attention`` (no N x N matrix)::

    q, k, v = query(x), key(x), value(x)           # in that order, as the originals call them
    k, v    = max_pool2d(k, 2), max_pool2d(v, 2)   # with pool=True (BigGAN: 2x2, floor)
    o       = v softmax(scale q^T k)^T             # (B, C_v, H, W)
    o       = post(o)                              # the output modules, in order (BigGAN: o; NonLocal: z, norm)
    out     = gamma * o + x   (or o + x without gamma; or o with residual=False)

The children keep the names the user's layer gave them (``names``), so ``state_dict`` keys do not change, and
the Parameter ``gamma`` is the user's own. ``scale`` is read at every call (timm's ``NonLocalAttn`` keeps its
logit scale in ``self.scale`` too). Dtypes follow eager: the attention output has the projections' dtype (under
autocast the 16-bit one) and the residual is the literal ``gamma * o + x``; without autocast, with equal dtypes
and a value projection as wide as ``x``, the residual runs inside the op.

``attnfast.swap`` builds these from BigGAN's ``Attention``, SAGAN layers with spectral norm or parametrizations,
and timm's ``NonLocalAttn``; nothing here is specific to one of them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_tensor
from .._dispatch import autocast_dtype
from ..ops.self_attention import self_attention


class ProjectedSelfAttention2d(nn.Module):
    """See the module doc. ``children``: the layer's modules by name (in the layer's order: they are registered
    so); ``query``/``key``/``value``: names of the three projections; ``post``: names of the output modules;
    ``gamma``: the residual weight Parameter (or None); ``pool``: 2x2 max pooling of keys and values."""

    def __init__(self, children: dict, *, query: str, key: str, value: str, post: Sequence[str] = (),
                 gamma: nn.Parameter | None = None, pool: bool = False, scale: float = 1.0, residual: bool = True,
                 tuple_output: bool = False):
        super().__init__()
        for role, name in (("query", query), ("key", key), ("value", value), *(("post", p) for p in post)):
            if not isinstance(children.get(name), nn.Module):
                raise ValueError(f"{role} names {name!r}, which is not one of the modules given "
                                 f"({', '.join(children) or 'none'})")
        if gamma is not None and (not isinstance(gamma, torch.Tensor) or gamma.numel() != 1):
            raise ValueError(f"gamma must be a one-element Parameter or None; got {gamma!r}")
        if gamma is not None and not residual:
            raise ValueError("gamma weighs the residual: it needs residual=True")
        if not isinstance(tuple_output, bool) or not isinstance(pool, bool) or not isinstance(residual, bool):
            raise ValueError("pool, residual and tuple_output must be bools")
        if gamma is not None:
            self.gamma = gamma
        for name, child in children.items():
            self.add_module(name, child)
        self._roles = (query, key, value)
        self._post = tuple(post)
        self.pool = pool
        self.scale = float(scale)
        self.residual = residual
        self.tuple_output = tuple_output

    def extra_repr(self) -> str:
        q, k, v = self._roles
        post = f", post={'+'.join(self._post)}" if self._post else ""
        return (f"query={q}, key={k}, value={v}{post}, pool={self.pool}, scale={self.scale:.4g}, "
                f"gamma={'gamma' in self._parameters}, residual={self.residual}")

    def forward(self, x: torch.Tensor):
        check_tensor(x, "x", ndim=4)
        b, c, h, w = x.shape
        query, key, value = (self._modules[n] for n in self._roles)
        q, k, v = query(x), key(x), value(x)
        if self.pool:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
        if q.shape[-2:] != (h, w) or k.shape[-2:] != v.shape[-2:]:
            raise ValueError(f"the query projection must keep x's {h}x{w} map and key/value agree; got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        dt = q.dtype
        qf, kf, vf = q.reshape(b, q.shape[1], h * w), k.reshape(b, k.shape[1], -1), v.reshape(b, v.shape[1], -1)
        kf, vf = kf.to(dt), vf.to(dt)
        gamma = self._parameters.get("gamma")
        fused_residual = (self.residual and not self._post and v.shape[1] == c and x.dtype == dt
                          and (gamma is None or gamma.dtype == dt) and autocast_dtype(x.device.type) is None)
        if fused_residual:
            g = gamma if gamma is not None else torch.ones((), dtype=dt, device=x.device)
            out = self_attention(qf, kf, vf, x.reshape(b, c, h * w), g, self.scale).reshape(b, c, h, w)
        else:
            o = self_attention(qf, kf, vf, scale=self.scale).reshape(b, v.shape[1], h, w)
            for name in self._post:
                o = self._modules[name](o)
            if not self.residual:
                out = o
            else:
                out = gamma * o + x if gamma is not None else o + x
        return (out, None) if self.tuple_output else out


__all__ = ["ProjectedSelfAttention2d"]
