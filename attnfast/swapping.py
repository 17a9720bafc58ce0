"""``attnfast.swap`` / ``attnfast.unswap``: put the fused attention modules into any model, keeping the weights.

``swap(model)`` walks the model and replaces, by *structure* rather than class name:

- grid attention: a module with 1x1 convolutions ``W_l``, ``W_g`` (no bias) and ``phi`` (to one channel,
  with bias) and attributes ``up_factor`` / ``normalize_attn`` (attnfast.reference.GridAttention or the
  tutorial's ``AttentionBlock``) -> ``attnfast.nn.GridAttention``;
- SAGAN self-attention: 1x1 ``query_conv`` / ``key_conv`` (``in_dim // 8`` channels) and ``value_conv``
  (``in_dim``) with biases, a scalar ``gamma`` (attnfast.reference.SelfAttention or the forum's
  ``Self_Attn`` / ``SelfAttention``) -> ``attnfast.nn.SelfAttention2d``;
- attnfast.reference.ResidualAttentionModule (that exact class) -> ``attnfast.nn.ResidualAttentionModule``.
  A user's subclass of it is left alone: its overrides would be lost in the fused class.

A candidate must have exactly those parameters (same names and shapes, nothing else), so a module that
merely shares a name is left alone. The new module gets the old one's weights (``load_state_dict``), device,
dtype, ``requires_grad`` flags and train/eval mode. ``unswap(model)`` does the reverse; a user's own class
swapped in earlier comes back as that class (with the current weights). Both return a list of
:class:`Replacement` (qualified name, old type, new type) that also carries ``.model``: the model that
holds the replacements (a copy when ``inplace=False``; the new module when the root itself was replaced).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

_ORIGINAL = "_attnfast_swapped_from"


@dataclasses.dataclass(frozen=True)
class Replacement:
    name: str  # qualified name in the model ("" for the root)
    old_type: str
    new_type: str


class SwapResult(list):
    """A list of :class:`Replacement`; ``.model`` is the model that holds them."""

    def __init__(self, items=(), model=None):
        super().__init__(items)
        self.model = model


def _type_name(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _is_conv1x1(m, bias: bool, out_channels: int | None = None) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1 and (m.bias is not None) == bias
            and (out_channels is None or m.out_channels == out_channels))


def _param_names(m: nn.Module) -> set:
    return {name for name, _ in m.named_parameters()} | {name for name, _ in m.named_buffers()}


# ----------------------------------------------------------------------------- grid attention
_GRID_PARAMS = {"W_l.weight", "W_g.weight", "phi.weight", "phi.bias"}


def _grid_spec(m: nn.Module):
    W_l, W_g, phi = (getattr(m, k, None) for k in ("W_l", "W_g", "phi"))
    up, norm = getattr(m, "up_factor", None), getattr(m, "normalize_attn", None)
    if not (_is_conv1x1(W_l, False) and _is_conv1x1(W_g, False) and _is_conv1x1(phi, True, 1)):
        return None
    if W_l.out_channels != W_g.out_channels or phi.in_channels != W_l.out_channels:
        return None
    if isinstance(up, bool) or not isinstance(up, (int, float)) or int(up) != up or up < 1:
        return None
    if not isinstance(norm, bool) or _param_names(m) != _GRID_PARAMS:
        return None
    return (W_l.in_channels, W_g.in_channels, W_l.out_channels, int(up)), {"normalize_attn": norm}


# ----------------------------------------------------------------------------- SAGAN self-attention
_SELF_PARAMS = {"query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
                "value_conv.weight", "value_conv.bias", "gamma"}


def _self_attn_spec(m: nn.Module):
    from .reference.self_attention import qk_dim

    q, k, v, gamma = (getattr(m, name, None) for name in ("query_conv", "key_conv", "value_conv", "gamma"))
    if not (_is_conv1x1(q, True) and _is_conv1x1(k, True) and _is_conv1x1(v, True)):
        return None
    c = v.in_channels
    if not (q.in_channels == k.in_channels == c and v.out_channels == c
            and q.out_channels == k.out_channels == qk_dim(c)):
        return None
    if not isinstance(gamma, nn.Parameter) or gamma.numel() != 1 or _param_names(m) != _SELF_PARAMS:
        return None
    return (c,), {"activation": getattr(m, "activation", None)}


# ----------------------------------------------------------------------------- residual attention
def _ram_spec(m: nn.Module):
    return (m.channels,), {"encoder_depth": m.encoder_depth, "p": len(m.first), "t": len(m.trunk),
                           "r": len(m.down[0])}


def _fused(name):
    def get():
        import importlib

        module, cls = name.rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)
    return get


# kind -> (spec(module) or None, fused class getter, reference class getter)
_KINDS = {
    "grid": (_grid_spec, _fused("attnfast.nn.grid_attention.GridAttention"),
             _fused("attnfast.reference.grid_attention.GridAttention")),
    "self_attention": (_self_attn_spec, _fused("attnfast.nn.self_attention.SelfAttention2d"),
                       _fused("attnfast.reference.self_attention.SelfAttention")),
    "residual_attention": (_ram_spec, _fused("attnfast.nn.residual_attention.ResidualAttentionModule"),
                           _fused("attnfast.reference.residual_attention.ResidualAttentionModule")),
}


def _classify(m: nn.Module, fused: bool):
    """The attention kind of ``m`` if it is a fused module (``fused=True``) or a swappable one."""
    from .reference.residual_attention import ResidualAttentionModule as RefRAM

    if isinstance(m, RefRAM):  # the fused RAM subclasses the reference: decide by exact class
        exact = _KINDS["residual_attention"][1 if fused else 2]()
        return "residual_attention" if type(m) is exact else None  # subclasses (user overrides) stay as they are
    for kind in ("grid", "self_attention"):
        spec, fused_cls, _ = _KINDS[kind]
        try:
            cls = fused_cls()
        except ImportError:  # that fused module is not installed in this build
            if fused:
                continue
            cls = None
        if fused:
            if cls is not None and isinstance(m, cls):
                return kind
        elif (cls is None or not isinstance(m, cls)) and spec(m) is not None:
            return kind
    return None


def _rebuild(old: nn.Module, cls, args, kwargs) -> nn.Module:
    new = cls(*args, **kwargs)
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict())
    flags = dict(old.named_parameters())
    for name, p in new.named_parameters():
        p.requires_grad_(flags[name].requires_grad)
    new.train(old.training)
    return new


def _fuse_one(m: nn.Module, kind: str) -> nn.Module:
    spec, fused_cls, ref_cls = _KINDS[kind]
    args, kwargs = spec(m)
    cls = fused_cls()
    if kind == "self_attention" and "activation" not in _init_params(cls):
        kwargs.pop("activation", None)
    new = _rebuild(m, cls, args, kwargs)
    if type(m) is not ref_cls() and kind != "residual_attention":
        # a user's own class: keep it (weights moved to the meta device) so unswap can restore that class
        new.__dict__[_ORIGINAL] = m.to("meta")
    return new


def _unfuse_one(m: nn.Module, kind: str) -> nn.Module:
    original = m.__dict__.get(_ORIGINAL)
    ref = next(iter(m.parameters()), None)
    if original is not None:
        restored = original.to_empty(device=ref.device if ref is not None else "cpu")
        restored.load_state_dict(m.state_dict())
        for name, p in restored.named_parameters():
            p.requires_grad_(dict(m.named_parameters())[name].requires_grad)
        return restored.train(m.training)
    spec, _, ref_cls = _KINDS[kind]
    found = spec(m)  # the fused twins keep the reference's parameter names and attributes
    if found is None:
        raise ValueError(f"unswap: {_type_name(m)} does not have the parameters of its reference module")
    args, kwargs = found
    return _rebuild(m, ref_cls(), args, kwargs)


def _init_params(cls) -> set:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def _walk(model: nn.Module, inplace: bool, to_fused: bool) -> SwapResult:
    if not isinstance(model, nn.Module):
        raise ValueError(f"swap/unswap expect a torch.nn.Module; got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    convert = _fuse_one if to_fused else _unfuse_one
    done: dict = {}  # id(old) -> new, so a module shared by two parents stays shared
    result = SwapResult(model=model)

    def visit(parent: nn.Module | None, attr: str, m: nn.Module, qual: str):
        kind = _classify(m, fused=not to_fused)
        if kind is not None:
            if id(m) not in done:
                done[id(m)] = convert(m, kind)
            new = done[id(m)]
            result.append(Replacement(qual, _type_name(m), _type_name(new)))
            if parent is None:
                result.model = new
            else:
                setattr(parent, attr, new)
            return
        for name, child in list(m._modules.items()):
            if child is not None:
                visit(m, name, child, f"{qual}.{name}" if qual else name)

    with torch.no_grad():
        visit(None, "", model, "")
    return result


def swap(model: nn.Module, *, inplace: bool = True) -> SwapResult:
    """Replace reference attention modules (attnfast's or structurally identical user ones) with fused twins."""
    return _walk(model, inplace, to_fused=True)


def unswap(model: nn.Module, *, inplace: bool = True) -> SwapResult:
    """Replace fused attention modules with their plain-PyTorch references (or the user's original class)."""
    return _walk(model, inplace, to_fused=False)


__all__ = ["swap", "unswap", "Replacement", "SwapResult"]
