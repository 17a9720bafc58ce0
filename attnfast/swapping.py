"""``attnfast.swap`` / ``attnfast.unswap``: put the fused attention modules into a model without changing its maths.

What is a candidate (by structure, not by class name):

- grid attention: children ``W_l``, ``W_g`` (1x1 ``nn.Conv2d`` without bias) and ``phi`` (1x1 to one
  channel, with bias) and attributes ``up_factor`` / ``normalize_attn`` (attnfast.reference.GridAttention,
  the seeds' ``AttentionBlock``, Learn to Pay Attention's ``GridAttentionBlock``) -> ``attnfast.nn.GridAttention``;
- SAGAN self-attention: 1x1 ``query_conv`` / ``key_conv`` (``max(in_dim // 8, 1)`` channels) and ``value_conv``
  (``in_dim``) with biases and a ``gamma`` of shape (1,) (attnfast.reference.SelfAttention, the forum's
  ``SelfAttention`` / ``Self_Attn``) -> ``attnfast.nn.SelfAttention2d``;
- residual attention: an ``attnfast.reference.ResidualAttentionModule`` -> ``attnfast.nn.ResidualAttentionModule``;
- CBAM: a ``channel`` child with 1x1 ``fc1``/``fc2`` and a ``spatial.conv`` with ``conv`` (odd k x k to one
  channel, 'same' padding, no bias) and a one-channel ``bn`` with BatchNorm2d's default settings
  (attnfast.reference.CBAM, timm's ``CbamModule``) -> ``attnfast.nn.cbam.CBAM``; with a one-channel spatial
  input (timm's ``LightCbamModule``, attnfast.reference.LightCBAM) -> ``attnfast.nn.cbam.LightCBAM``.

A candidate must have exactly the parameters and buffers of the fused module (names and shapes), no
public methods of its own besides ``forward``, and no hooks on children that the fused module does not run
(the fused grid op reads ``W_l``/``W_g``/``phi``'s weights without calling them; nothing calls a SAGAN
layer's ``softmax``).

**The probe.** Before replacing a module, swap runs it and each fused configuration that could express
it (grid: ``a`` or the logits ``c``; SAGAN: tuple or tensor output times ``scale`` in 1, 1/sqrt(d),
1/sqrt(in_dim)) on a small random input (batch 2; SAGAN 4x6 maps, residual attention 2**encoder_depth
square, grid attention ``g`` of s x (s + 1) with s = max(1, 8 // up_factor) and ``l`` ``up_factor`` times
that), in the module's dtype and on its device (on CUDA that runs the kernels), twice:
with the module's own parameters in its current train/eval mode, then with randomly perturbed parameters
(SAGAN's ``gamma = 0`` would hide the attention) in the other mode; forward, then backward with random
output gradients. The output structure must be the same (tensor, tuple or list, the same length, shapes
and dtypes) and every output, input gradient and parameter gradient must agree:
``max|new - old| <= rtol * max(max|old|, 0.01 * M)`` per tensor (M: the largest ``max|old|`` among the
outputs, or among the gradients), with rtol 1e-5 for float64, 2e-3 for float32 (TF32 on CUDA), 1e-2 for
float16 and 5e-2 for bfloat16; for float16/bfloat16 modules the allowance is at least twice the original's own
rounding error (its distance from the same probe run in float32). The closest passing configuration is
used; if none passes the module is left alone. One difference is deliberate: where a SAGAN layer returned
``(out, attention)`` the fused layer returns ``(out, None)`` (attnfast never builds the N x N matrix;
``attnfast.nn.self_attention.attention_maps(layer, x, queries)`` computes chosen rows of it). The probe
leaves the module as it was: it calls ``forward`` directly (the module's own hooks do not run; its
children's do), on copies of the buffers (BatchNorm statistics and ``num_batches_tracked`` unchanged),
takes gradients with ``torch.autograd.grad`` (no ``.grad`` is touched), restores every train/eval flag and
the CPU and CUDA random states. On CPU it runs single-threaded (``torch.set_num_threads(1)``, restored after):
its tensors are tiny. A forward that assigns attributes on the module (e.g. keeps its last
attention map) is a side effect the fused module would drop: left alone.

**The swap.** The fused module adopts the original's children (its ``nn.Conv2d`` objects, so their hooks
stay; a child of another library's class, e.g. timm's, gives its Parameters and buffers to the fused
module's own child of that name), Parameter objects and buffers themselves: nothing is copied or moved,
``state_dict()`` keys are unchanged and an optimizer built before ``swap`` trains the swapped model. The
module's own hooks (forward, pre-forward, backward, state-dict) are carried over, and its public attributes
that the fused class lacks are copied. The original module is kept on the fused one; ``unswap`` puts it
back, exactly as it was, with the same Parameters (re-adopting any the fused module was given meanwhile).
A fused module built directly (``attention="fused"``) is unswapped into the reference class by the same
adoption and probe.

**The report.** Both return a :class:`SwapResult`: a list of :class:`Replacement` (qualified name, old and
new type, the chosen options, notes such as the ``(out, None)`` difference or carried hooks), ``.skipped``
(:class:`Skipped`: name, type, reason for each candidate left alone) and ``.model`` (the model that holds the
replacements: a copy when ``inplace=False``, the new module when the root itself was replaced). Skips are
also reported in one :class:`SwapWarning` listing path, class and reason. ``dry_run=True`` returns the same
report and changes nothing; ``strict=True`` raises ``ValueError`` with that list (changing nothing) instead of
skipping. The probe runs the original forward a few times on tiny inputs, so forwards with outside side
effects (logging, counters in globals) see those calls.

``torch.compile``: swap before or after compiling. Given an ``OptimizedModule``, swap changes the module it
wraps (``_orig_mod``); dynamo's guards see the replaced modules and the next call recompiles (one extra
compilation: swapping first avoids it). The probe itself runs eagerly.
``DistributedDataParallel``: swap before or after wrapping; the Parameters DDP registered are the ones the
fused modules use.

Adding a kind is one :class:`Kind` entry in ``KINDS`` and its spec function.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import math
import warnings
from typing import Callable

import torch
import torch.nn as nn

_ORIGINAL = "_attnfast_swapped_from"
_BUILT = "_attnfast_built_children"  # children swap built (another library's class), not adopted
_PROBE_SEED = 20240917


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Replacement:
    name: str  # qualified name in the model ("" for the root)
    old_type: str
    new_type: str
    options: tuple = ()  # (name, value) pairs of the new module's configuration chosen by the probe
    notes: tuple = ()  # what a user should know (deliberate differences, carried hooks)


@dataclasses.dataclass(frozen=True)
class Skipped:
    name: str
    type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name or '<root>'} ({self.type}): {self.reason}"


class SwapResult(list):
    """A list of :class:`Replacement`; ``.skipped`` lists candidates left alone, ``.model`` holds the result."""

    def __init__(self, items=(), model=None, skipped=(), dry_run: bool = False):
        super().__init__(items)
        self.model = model
        self.skipped = list(skipped)
        self.dry_run = dry_run

    def summary(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"{verb} {len(self)} module(s), left {len(self.skipped)} alone"]
        for r in self:
            opts = ", ".join(f"{k}={v!r}" for k, v in r.options)
            lines.append(f"  {r.name or '<root>'}: {r.old_type} -> {r.new_type}" + (f" ({opts})" if opts else ""))
            lines += [f"    note: {n}" for n in r.notes]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


class SwapWarning(UserWarning):
    """Emitted once per swap/unswap call that left candidates alone."""


class NotSwappable(Exception):
    """Raised by a spec function: the module looks like the kind but cannot be replaced (the reason)."""


# ----------------------------------------------------------------------------------------------
# the table of kinds
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration of the target class to probe."""

    kwargs: dict
    dropped: tuple = ()  # output positions where one side may return None for the other's tensor
    note: str = ""  # reported when a dropped position held a tensor


@dataclasses.dataclass
class Spec:
    args: tuple  # positional constructor arguments of the target class
    candidates: list  # of Candidate (keyword arguments on top of ``args``)
    inputs: Callable  # (generator, dtype, device) -> tuple of probe inputs (batch 2)


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    fused: str  # "module.Class" of the fused module
    reference: str  # "module.Class" of the plain-PyTorch module
    looks_like: Callable  # (module) -> bool: a candidate to check (and report if it cannot be swapped)
    spec: Callable  # (module) -> Spec; raises NotSwappable(reason)
    fused_runs: frozenset | None = None  # children whose forward the fused module calls (None: all)


def _cls(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _type_name(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _require_conv1x1(m, name: str, bias: bool, out_channels: int | None = None) -> nn.Conv2d:
    if type(m) is not nn.Conv2d:
        raise NotSwappable(f"{name} is {type(m).__name__}, not an nn.Conv2d")
    if (m.kernel_size, m.stride, m.padding, m.dilation, m.groups) != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
        raise NotSwappable(f"{name} is not a plain 1x1 convolution (kernel {m.kernel_size}, stride {m.stride}, "
                           f"padding {m.padding}, dilation {m.dilation}, groups {m.groups})")
    if (m.bias is not None) != bias:
        raise NotSwappable(f"{name} {'has no' if bias else 'has a'} bias; the fused module's {name} "
                           f"{'has one' if bias else 'has none'}")
    if out_channels is not None and m.out_channels != out_channels:
        raise NotSwappable(f"{name} has {m.out_channels} output channels; expected {out_channels}")
    return m


def _require_tensors(m: nn.Module, expected: set) -> None:
    names = {n for n, _ in m.named_parameters()} | {n for n, _ in m.named_buffers()}
    if names != expected:
        extra, missing = sorted(names - expected), sorted(expected - names)
        parts = [f"extra {', '.join(extra)}"] if extra else []
        parts += [f"missing {', '.join(missing)}"] if missing else []
        raise NotSwappable(f"parameters/buffers differ from the fused module's: {'; '.join(parts)}")


def _randn(gen, dtype, device, *shape):
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


# --- grid attention --------------------------------------------------------------------------
_GRID_TENSORS = {"W_l.weight", "W_g.weight", "phi.weight", "phi.bias"}


def _grid_looks_like(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, k, None), nn.Module) for k in ("W_l", "W_g", "phi"))


def _grid_spec(m: nn.Module) -> Spec:
    W_l = _require_conv1x1(m.W_l, "W_l", bias=False)
    W_g = _require_conv1x1(m.W_g, "W_g", bias=False)
    phi = _require_conv1x1(m.phi, "phi", bias=True, out_channels=1)
    if W_l.out_channels != W_g.out_channels or phi.in_channels != W_l.out_channels:
        raise NotSwappable(f"W_l, W_g and phi disagree on attn_features ({W_l.out_channels}, {W_g.out_channels}, "
                           f"{phi.in_channels})")
    up, norm = getattr(m, "up_factor", None), getattr(m, "normalize_attn", None)
    if isinstance(up, bool) or not isinstance(up, (int, float)) or int(up) != up or up < 1:
        raise NotSwappable(f"up_factor must be a positive integer attribute; got {up!r}")
    if not isinstance(norm, bool):
        raise NotSwappable(f"normalize_attn must be a bool attribute; got {norm!r}")
    _require_tensors(m, _GRID_TENSORS)
    up = int(up)
    known = getattr(m, "return_logits", None) if isinstance(m, _cls(KINDS_BY_NAME["grid"].reference)) else None
    logits_note = "returns the logits c (before the softmax/sigmoid) like the original"
    candidates = [Candidate({"normalize_attn": norm, "return_logits": rl}, note=logits_note if rl else "")
                  for rl in ([known] if known is not None else [False, True])]
    side = max(1, 8 // up)  # g is side x (side + 1), l is up_factor times that

    def inputs(gen, dtype, device):
        return (_randn(gen, dtype, device, 2, W_l.in_channels, side * up, (side + 1) * up),
                _randn(gen, dtype, device, 2, W_g.in_channels, side, side + 1))

    return Spec((W_l.in_channels, W_g.in_channels, W_l.out_channels, up), candidates, inputs)


# --- SAGAN self-attention ----------------------------------------------------------------------
_SELF_TENSORS = {"query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
                 "value_conv.weight", "value_conv.bias", "gamma"}
_ATTENTION_NOTE = ("returns (out, None) where the original returned (out, attention): attnfast does not build "
                   "the N x N attention matrix; attnfast.nn.self_attention.attention_maps(layer, x, queries) "
                   "computes chosen rows of it")


def _self_attention_looks_like(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, k, None), nn.Module) for k in ("query_conv", "key_conv", "value_conv"))


def _self_attention_spec(m: nn.Module) -> Spec:
    from .reference.self_attention import qk_dim

    v = _require_conv1x1(m.value_conv, "value_conv", bias=True)
    c, d = v.in_channels, qk_dim(v.in_channels)
    if getattr(m, "pool", False) or getattr(m, "heads", 1) != 1 or getattr(m, "out_conv", None) is not None:
        raise NotSwappable("pool, heads or value_dim options have no plain-PyTorch reference equivalent")
    q = _require_conv1x1(m.query_conv, "query_conv", bias=True, out_channels=d)
    k = _require_conv1x1(m.key_conv, "key_conv", bias=True, out_channels=d)
    _require_conv1x1(v, "value_conv", bias=True, out_channels=c)
    if q.in_channels != c or k.in_channels != c:
        raise NotSwappable(f"query_conv/key_conv/value_conv input channels differ ({q.in_channels}, "
                           f"{k.in_channels}, {c})")
    gamma = getattr(m, "gamma", None)
    if not isinstance(gamma, nn.Parameter) or tuple(gamma.shape) != (1,):
        raise NotSwappable(f"gamma must be an nn.Parameter of shape (1,); got "
                           f"{tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__}")
    _require_tensors(m, _SELF_TENSORS)
    ours = (_cls(KINDS_BY_NAME["self_attention"].reference), _cls(KINDS_BY_NAME["self_attention"].fused))
    if isinstance(m, ours):
        options = [(m.tuple_output, m.scale)]
    else:
        scales = list(dict.fromkeys([1.0, 1.0 / math.sqrt(d), 1.0 / math.sqrt(c)]))
        options = list(itertools.product([True, False], scales))
    candidates = [Candidate({"activation": getattr(m, "activation", None), "tuple_output": t, "scale": s},
                            dropped=(1,) if t else (), note=_ATTENTION_NOTE if t else "") for t, s in options]

    def inputs(gen, dtype, device):
        return (_randn(gen, dtype, device, 2, c, 4, 6),)

    return Spec((c,), candidates, inputs)


# --- residual attention ---------------------------------------------------------------------------
def _ram_looks_like(m: nn.Module) -> bool:
    return isinstance(m, _cls(KINDS_BY_NAME["residual_attention"].reference))


def _ram_spec(m: nn.Module) -> Spec:
    channels = m.channels
    kwargs = {"encoder_depth": m.encoder_depth, "p": len(m.first), "t": len(m.trunk), "r": len(m.down[0])}
    side = 2 ** m.encoder_depth  # every mask level above 1x1 (the probe's cost grows with channels x side^2)

    def inputs(gen, dtype, device):
        return (_randn(gen, dtype, device, 2, channels, side, side),)

    return Spec((channels,), [Candidate(kwargs)], inputs)


# --- CBAM (attnfast's reference, timm's CbamModule / LightCbamModule, look-alikes) ---------------------
def _cbam_looks_like(m: nn.Module, light: bool) -> bool:
    channel, spatial = getattr(m, "channel", None), getattr(m, "spatial", None)
    conv = getattr(getattr(spatial, "conv", None), "conv", None)
    if not (isinstance(getattr(channel, "fc1", None), nn.Module) and isinstance(getattr(channel, "fc2", None), nn.Module)
            and isinstance(conv, nn.Conv2d)):
        return False
    return conv.in_channels == (1 if light else 2)  # the light spatial gate convolves one pooled map, CBAM two


def _cbam_spec(m: nn.Module) -> Spec:
    fc1 = _require_conv1x1(m.channel.fc1, "channel.fc1", bias=m.channel.fc1.bias is not None)
    fc2 = _require_conv1x1(m.channel.fc2, "channel.fc2", bias=fc1.bias is not None, out_channels=fc1.in_channels)
    if fc2.in_channels != fc1.out_channels:
        raise NotSwappable(f"channel.fc1 has {fc1.out_channels} outputs but channel.fc2 takes {fc2.in_channels}")
    act = getattr(m.channel, "act", None)
    if act is not None and type(act) is not nn.ReLU:
        raise NotSwappable(f"channel.act is {type(act).__name__}; the fused CBAM computes a ReLU MLP")
    for where in ("channel", "spatial"):
        gate = getattr(getattr(m, where), "gate", None)
        if gate is not None and type(gate).__name__ != "Sigmoid":  # nn.Sigmoid or timm's Sigmoid
            raise NotSwappable(f"{where}.gate is {type(gate).__name__}; the fused CBAM computes sigmoid gates")
    conv, bn = m.spatial.conv.conv, getattr(m.spatial.conv, "bn", None)
    k = conv.kernel_size[0]
    if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1) or conv.padding != (k // 2, k // 2)
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is not None or conv.out_channels != 1):
        raise NotSwappable(f"spatial.conv.conv is not an odd k x k, stride-1, 'same'-padded, bias-free conv to one "
                           f"channel (kernel {conv.kernel_size}, padding {conv.padding}, bias {conv.bias is not None})")
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != 1:
        raise NotSwappable(f"spatial.conv.bn is {type(bn).__name__}, not a one-channel BatchNorm2d")
    for extra in ("act", "drop"):  # timm's BatchNormAct2d: only as a plain BatchNorm
        layer = getattr(bn, extra, None)
        if layer is not None and not isinstance(layer, nn.Identity):
            raise NotSwappable(f"spatial.conv.bn.{extra} is {type(layer).__name__}; the fused CBAM's BatchNorm has none")
    # the fused module is built with nn.BatchNorm2d's defaults; its tensors are adopted, its settings are not
    if (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) != (1e-5, 0.1, True, True):
        raise NotSwappable(f"spatial.conv.bn has eps={bn.eps}, momentum={bn.momentum}, affine={bn.affine}, "
                           f"track_running_stats={bn.track_running_stats}; the fused CBAM uses BatchNorm2d's defaults")
    c = fc1.in_channels
    kwargs = {"rd_channels": fc1.out_channels, "spatial_kernel_size": k, "mlp_bias": fc1.bias is not None}

    def inputs(gen, dtype, device):
        return (_randn(gen, dtype, device, 2, c, 6, 5),)

    return Spec((c,), [Candidate(kwargs)], inputs)


KINDS = (
    Kind("grid", "attnfast.nn.grid_attention.GridAttention", "attnfast.reference.grid_attention.GridAttention",
         _grid_looks_like, _grid_spec, fused_runs=frozenset()),
    Kind("self_attention", "attnfast.nn.self_attention.SelfAttention2d",
         "attnfast.reference.self_attention.SelfAttention", _self_attention_looks_like, _self_attention_spec,
         fused_runs=frozenset({"query_conv", "key_conv", "value_conv"})),
    Kind("residual_attention", "attnfast.nn.residual_attention.ResidualAttentionModule",
         "attnfast.reference.residual_attention.ResidualAttentionModule", _ram_looks_like, _ram_spec),
    # The fused CBAM reads the gates' weights itself: it calls none of the children's forwards.
    Kind("cbam", "attnfast.nn.cbam.CBAM", "attnfast.reference.cbam.CBAM",
         lambda m: _cbam_looks_like(m, light=False), _cbam_spec, fused_runs=frozenset()),
    Kind("light_cbam", "attnfast.nn.cbam.LightCBAM", "attnfast.reference.cbam.LightCBAM",
         lambda m: _cbam_looks_like(m, light=True), _cbam_spec, fused_runs=frozenset()),
)
KINDS_BY_NAME = {k.name: k for k in KINDS}


# ----------------------------------------------------------------------------------------------
# building a candidate: adopt the original's children, Parameters and buffers
# ----------------------------------------------------------------------------------------------
_KEEP_METHODS = {"forward", "extra_repr"}


def _own_methods(m: nn.Module) -> list:
    """Public methods/properties that the user's classes (not torch's, not attnfast's) define."""
    names = []
    for klass in type(m).__mro__:
        if klass.__module__.split(".")[0] in ("torch", "attnfast", "builtins"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in _KEEP_METHODS or name in names:
                continue
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                names.append(name)
    return names


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, attr, None) for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                   "_backward_pre_hooks"))


def _hook_dicts(m: nn.Module) -> list:
    return [k for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict)]


def _is_ours(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "attnfast"


def _adopt_tensors(mine: nn.Module, theirs: nn.Module) -> None:
    """Put ``theirs``' Parameter and buffer objects (and train/eval flags) into ``mine`` at the same names."""
    for path, sub in mine.named_modules():
        try:
            other = theirs.get_submodule(path)
        except AttributeError:
            continue
        for store in ("_parameters", "_buffers"):
            here, there = getattr(sub, store), getattr(other, store)
            for leaf in here:
                if there.get(leaf) is not None:
                    here[leaf] = there[leaf]
        sub.training = other.training


def _build(old: nn.Module, cls, args: tuple, kwargs: dict, runs: frozenset | None) -> nn.Module:
    """``cls(*args, **kwargs)`` holding ``old``'s children, Parameters and buffers (nothing allocated)."""
    try:
        with torch.device("meta"):
            new = cls(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise NotSwappable(f"{cls.__name__}{args} does not accept these options: {e}") from None
    adopted, built = set(), set()
    for name, child in new._modules.items():
        theirs = old._modules.get(name)
        if child is None or theirs is None:
            continue
        if type(theirs) is type(child):
            new._modules[name] = theirs  # the child itself: its hooks and attributes stay
            adopted.add(name)
        else:  # another library's class for the same layer (timm's): adopt its Parameters and buffers
            _adopt_tensors(child, theirs)
            built.add(name)
    new.__dict__[_BUILT] = frozenset(built)  # unswap gives these back to the original's own children
    for store in ("_parameters", "_buffers"):
        mine, theirs = getattr(new, store), getattr(old, store)
        for name in mine:
            if name in theirs:
                mine[name] = theirs[name]
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set) & set(new._buffers)
    old_names = {n for n, _ in old.named_parameters()} | {n for n, _ in old.named_buffers()}
    new_named = dict(new.named_parameters())
    new_named.update(new.named_buffers())
    if set(new_named) != old_names:
        raise NotSwappable(f"parameters/buffers differ from the fused module's: "
                           f"{sorted(set(new_named) ^ old_names)}")
    old_named = dict(old.named_parameters())
    old_named.update(old.named_buffers())
    if any(new_named[n] is not old_named[n] for n in old_names):
        raise NotSwappable("its parameters could not be adopted as they are")
    if set(new.state_dict().keys()) != set(old.state_dict().keys()):
        raise NotSwappable("its state_dict keys would change")
    # hooks on children that the new module never calls would silently stop running
    not_run = [n for n in old._modules if n not in adopted or (runs is not None and n not in runs)]
    for name in not_run:
        child = old._modules[name]
        for sub_name, sub in (child.named_modules(prefix=name) if child is not None else ()):
            if _has_hooks(sub):
                raise NotSwappable(f"{sub_name} has hooks, which would not run: the {cls.__name__} does not "
                                   f"call {name}")
    new.training = old.training
    for name, child in new._modules.items():
        if name not in adopted and child is not None and name not in old._modules:
            child.train(old.training)
    if not _is_ours(old):
        for key, value in vars(old).items():
            if not key.startswith("_") and key != "training" and not hasattr(new, key):
                new.__dict__[key] = value
    return new


# ----------------------------------------------------------------------------------------------
# the probe
# ----------------------------------------------------------------------------------------------
_RTOL = {torch.float64: 1e-5, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_RELATIVE_FLOOR = 1e-2  # a tensor's scale is at least this share of the largest in its group
_TINY = 1e-30


class _Direct(nn.Module):
    """Calls ``m.forward`` itself: the module's own hooks stay out of the probe."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, *args):
        return self.m.forward(*args)


class _Mismatch(Exception):
    pass


def _leaves(out, where="output"):
    """(path, value) for every leaf of a nested tuple/list output, with structure markers."""
    if isinstance(out, (tuple, list)):
        yield where, (type(out).__name__, len(out))
        for i, o in enumerate(out):
            yield from _leaves(o, f"{where}[{i}]")
    else:
        yield where, out


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {tuple(v.shape)} {str(v.dtype).replace('torch.', '')} tensor"
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return f"a {v[0]} of {v[1]}"
    return type(v).__name__ if v is not None else "None"


def _error(ref: torch.Tensor, new: torch.Tensor, scale: float, allow: float = 0.0) -> float:
    """max|new - ref| / max(rtol * scale, allow): <= 1 passes (inf where finiteness differs)."""
    rtol = _RTOL.get(ref.dtype, 2e-3)
    ref32, new32 = ref.detach().float(), new.detach().float()
    finite = torch.isfinite(ref32)
    if not torch.equal(finite, torch.isfinite(new32)):
        return math.inf
    if not finite.all():
        ref32, new32 = ref32[finite], new32[finite]
    if ref32.numel() == 0:
        return 0.0
    return (new32 - ref32).abs().max().item() / max(rtol * max(scale, _TINY), allow)


def _rounding(ref, truth) -> float:
    """How far the original in its own (half) dtype is from the same original run in float32: 2 max|ref - truth|."""
    if not isinstance(ref, torch.Tensor) or not isinstance(truth, torch.Tensor) or ref.shape != truth.shape:
        return 0.0
    diff = (ref.detach().float() - truth.detach().float()).abs()
    diff = diff[torch.isfinite(diff)]
    return 2.0 * diff.max().item() if diff.numel() else 0.0


def _abs_max(t: torch.Tensor) -> float:
    t = t.detach()
    t = t[torch.isfinite(t)] if t.is_floating_point() else t
    return t.abs().max().float().item() if t.numel() else 0.0


def _compare_outputs(ref, new, dropped: tuple, truth=None) -> tuple:
    """(worst error ratio, worst place, dropped tensor positions) or raise _Mismatch(structure difference)."""
    ref_leaves, new_leaves = list(_leaves(ref)), list(_leaves(new))
    if [p for p, _ in ref_leaves] != [p for p, _ in new_leaves]:
        raise _Mismatch(f"returns {_describe(next(iter(dict(ref_leaves).values())))}, the fused module "
                        f"{_describe(next(iter(dict(new_leaves).values())))}")
    worst, where, drops = 0.0, "", []
    truth = dict(_leaves(truth)) if truth is not None else {}
    top_scale = max((_abs_max(r) for _, r in ref_leaves if isinstance(r, torch.Tensor) and r.is_floating_point()),
                    default=0.0)
    for (path, r), (_, n) in zip(ref_leaves, new_leaves):
        top = path[len("output["):].split("]")[0] if path.startswith("output[") else None
        if top is not None and top.isdigit() and int(top) in dropped and path == f"output[{top}]":
            if r is None and n is None:
                continue
            if (r is None and isinstance(n, torch.Tensor)) or (n is None and isinstance(r, torch.Tensor)):
                drops.append(path)
                continue
        if isinstance(r, torch.Tensor) != isinstance(n, torch.Tensor):
            raise _Mismatch(f"{path} is {_describe(r)}; the fused module returns {_describe(n)}")
        if isinstance(r, torch.Tensor):
            if r.shape != n.shape or r.dtype != n.dtype:
                raise _Mismatch(f"{path} is {_describe(r)}; the fused module returns {_describe(n)}")
            if not r.is_floating_point():
                if not torch.equal(r, n):
                    raise _Mismatch(f"{path} differs")
                continue
            e = _error(r, n, max(_abs_max(r), _RELATIVE_FLOOR * top_scale), _rounding(r, truth.get(path)))
            if e > worst:
                worst, where = e, path
        elif r != n:
            raise _Mismatch(f"{path} is {r!r}; the fused module returns {n!r}")
    return worst, where, drops


def _differentiable(out, dropped: tuple) -> list:
    """Paths of outputs to send gradients into (floating tensors that require grad, dropped ones excluded)."""
    paths = []
    for path, v in _leaves(out):
        top = path[len("output["):].split("]")[0] if path.startswith("output[") else None
        if top is not None and top.isdigit() and int(top) in dropped:
            continue
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad:
            paths.append(path)
    return paths


def _seed_rng(device: torch.device, seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _run(module: nn.Module, tensors: dict, inputs: tuple, device, seed: int):
    """Forward through ``module.forward`` with ``tensors`` (name -> tensor) in place of its own."""
    _seed_rng(device, seed)
    xs = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = torch.func.functional_call(_Direct(module), {f"m.{k}": v for k, v in tensors.items()}, xs,
                                     strict=False, tie_weights=True)
    return out, xs


def _snapshot(m: nn.Module) -> dict:
    """The public attributes of every module in ``m`` (module -> {name: value})."""
    return {sub: {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"}
            for sub in m.modules()}


def _changed(before: dict) -> bool:
    return any(_snapshot_one(sub).keys() != attrs.keys()
               or any(_snapshot_one(sub)[k] is not v for k, v in attrs.items()) for sub, attrs in before.items())


def _snapshot_one(sub: nn.Module) -> dict:
    return {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"}


def _restore_attributes(before: dict) -> None:
    for sub, attrs in before.items():
        for k in set(_snapshot_one(sub)) - set(attrs):
            del sub.__dict__[k]
        sub.__dict__.update(attrs)


def _perturbed(params: list, gen: torch.Generator) -> dict:
    """The parameters plus noise of their own spread (1 for constant ones, e.g. SAGAN's gamma = 0)."""
    out = {}
    for n, p in params:
        p = p.detach()
        spread = p.float().std().item() if p.numel() > 1 else 0.0
        noise = _randn(gen, p.dtype, p.device, *p.shape) * (spread if spread > 0 else 1.0)
        out[n] = (p + noise).requires_grad_(p.requires_grad)
    return out


def _grads(out, paths: list, wrt: list, cotangents: list) -> list:
    leaves = dict(_leaves(out))
    if not paths or not wrt:
        return [None] * len(wrt)
    return list(torch.autograd.grad([leaves[p] for p in paths], wrt, cotangents, allow_unused=True,
                                    retain_graph=True))


def _check_grads(labels: list, ref: list, new: list, scale_of: Callable, truth: list | None) -> tuple:
    worst, where = 0.0, ""
    for label, a, b, t in zip(labels, ref, new, truth or [None] * len(ref)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        e = _error(a, b, scale_of(a), _rounding(a, t))
        if e > worst:
            worst, where = e, label
    return worst, where


def _float32_run(old: nn.Module, values: dict, buffers: dict, inputs: tuple, device, seed: int):
    """The original in float32 (its half-precision rounding error calibrates the tolerance), or None."""
    def up(t):
        return t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t.clone()
    values32 = {n: up(v) for n, v in values.items()}
    try:
        out, xs = _run(old, {**values32, **{n: up(b) for n, b in buffers.items()}},
                       tuple(up(t) for t in inputs), device, seed)
    except Exception:  # noqa: BLE001 - a forward tied to its dtype: no calibration
        return None
    return out, xs, values32


def _probe(old: nn.Module, candidates: list, spec: Spec) -> tuple:
    """(index of the best candidate, notes) or raise NotSwappable saying why none matches.

    Two runs: the module's own parameters in its current mode, then perturbed parameters in the other mode.
    Each run: forward of the original and every remaining candidate on the same input, outputs compared, then
    gradients of the inputs and parameters for the same random output gradients compared.
    """
    first = next(itertools.chain(old.parameters(), old.buffers()), None)
    if first is None:
        raise NotSwappable("has no parameters to tell its dtype and device")
    device, dtype = first.device, first.dtype
    if device.type == "meta":
        raise NotSwappable("its parameters are on the meta device: it cannot be probed")
    if not first.is_floating_point():
        dtype = torch.get_default_dtype()
    rtol = _RTOL.get(dtype, 2e-3)
    alive = dict(enumerate(candidates))
    worst = {i: 0.0 for i in alive}
    failures, drops = {}, {i: set() for i in alive}
    flags = {sub: sub.training for _, m in candidates for sub in m.modules()}
    flags.update({sub: sub.training for sub in old.modules()})
    before = _snapshot(old)
    gen = torch.Generator(device=device)
    gen.manual_seed(_PROBE_SEED)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    params = list(old.named_parameters())
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else _null()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only add overhead (and contention)
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad(), no_autocast:
            for run, (training, perturbed) in enumerate(((old.training, False), (not old.training, True))):
                mode = f"{'train' if training else 'eval'} mode, {'perturbed' if perturbed else 'own'} parameters"
                inputs = spec.inputs(gen, dtype, device)
                values = _perturbed(params, gen) if perturbed else dict(params)
                wrt_names = [n for n, _ in params if values[n].requires_grad]
                buffers = dict(old.named_buffers())
                if run:  # the first run keeps every submodule's own flag (e.g. a frozen BatchNorm in a
                    # training model: candidates mirror the original's flags), the second forces the other mode
                    for m in [old] + [m for _, m in candidates]:
                        _set_mode(m, training)
                try:
                    ref, ref_x = _run(old, {**values, **{n: b.clone() for n, b in buffers.items()}},
                                      inputs, device, _PROBE_SEED + run)
                except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
                    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                    raise NotSwappable(f"its forward raised on the probe input {shapes}: {type(e).__name__}: {e}")
                if _changed(before):
                    raise NotSwappable("its forward assigns attributes on the module (a side effect the fused "
                                       "module would not have)")
                truth = _float32_run(old, values, buffers, inputs, device, _PROBE_SEED + run) \
                    if dtype in (torch.float16, torch.bfloat16) else None
                ref_grads = {}  # differentiated output paths -> (labels, wrt values, gradients, cotangents)
                for i, (cand, m) in list(alive.items()):
                    try:
                        new, new_x = _run(m, {**values, **{n: b.clone() for n, b in buffers.items()}},
                                          inputs, device, _PROBE_SEED + run)
                        err, where, dropped = _compare_outputs(ref, new, cand.dropped,
                                                               truth[0] if truth else None)
                        if err > 1.0:
                            raise _Mismatch(f"{where} differs by {err:.3g} times the tolerance (rtol {rtol:g}; "
                                            f"{mode})")
                        drops[i].update(dropped)
                        paths = _differentiable(ref, cand.dropped)
                        if paths != _differentiable(new, cand.dropped):
                            raise _Mismatch("different outputs carry gradients")
                        key = tuple(paths)
                        if key not in ref_grads:
                            ref_map = dict(_leaves(ref))
                            cot = [_randn(gen, ref_map[p].dtype, ref_map[p].device, *ref_map[p].shape)
                                   for p in paths]
                            wrt = [t for t in ref_x if t.requires_grad] + [values[n] for n in wrt_names]
                            labels = [f"input {j} gradient" for j, t in enumerate(ref_x) if t.requires_grad] + [
                                f"{n} gradient" for n in wrt_names]
                            g_truth = None
                            if truth:
                                t_out, t_x, t_values = truth
                                t_wrt = [t for t in t_x if t.requires_grad] + [t_values[n] for n in wrt_names]
                                g_truth = _grads(t_out, paths, t_wrt, [c.float() for c in cot])
                            ref_grads[key] = (labels, _grads(ref, paths, wrt, cot), cot, g_truth)
                        labels, g_ref, cot, g_truth = ref_grads[key]
                        wrt_new = [t for t in new_x if t.requires_grad] + [values[n] for n in wrt_names]
                        g_new = _grads(new, paths, wrt_new, cot)
                        scale = max((_abs_max(t) for t in g_ref if t is not None), default=0.0)
                        gerr, gwhere = _check_grads(labels, g_ref, g_new,
                                                    lambda t: max(_abs_max(t), _RELATIVE_FLOOR * scale), g_truth)
                        if gerr > 1.0:
                            raise _Mismatch(f"{gwhere} differs by {gerr:.3g} times the tolerance (rtol {rtol:g}; "
                                            f"{mode})")
                        worst[i] = max(worst[i], err, gerr)
                    except _Mismatch as e:
                        failures[i] = str(e)
                        del alive[i]
                    except Exception as e:  # noqa: BLE001 - a fused configuration that cannot run this input
                        failures[i] = f"the fused module raised {type(e).__name__}: {e}"
                        del alive[i]
                if not alive:
                    break
    finally:
        torch.set_num_threads(threads)
        for sub, flag in flags.items():
            sub.training = flag
        _restore_attributes(before)
    if not alive:
        if len(candidates) == 1:
            raise NotSwappable(f"the probe found different maths: {failures[0]}")
        raise NotSwappable("no fused configuration computes the same: " + "; ".join(
            f"[{_options(candidates[i][0])}] {failures[i]}" for i in sorted(failures)))
    best = min(alive, key=lambda i: worst[i])
    note = candidates[best][0].note
    return best, [note] if note and (drops[best] or not candidates[best][0].dropped) else []


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _set_mode(m: nn.Module, training: bool) -> None:
    for sub in m.modules():
        sub.training = training


def _options(c: Candidate) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in c.kwargs.items() if k != "activation")


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else repr(v)


# ----------------------------------------------------------------------------------------------
# swap / unswap
# ----------------------------------------------------------------------------------------------
def _classify(m: nn.Module, to_fused: bool):
    """The kind to convert ``m`` with (or None): a fused module for unswap, a candidate for swap."""
    for kind in KINDS:
        try:
            fused = _cls(kind.fused)
        except ImportError:  # that fused module is not in this build
            continue
        if to_fused:
            if not isinstance(m, fused) and kind.looks_like(m):
                return kind
        elif isinstance(m, fused):
            return kind
    return None


def _convert(m: nn.Module, kind: Kind, to_fused: bool):
    """(new module, Replacement fields) or raise NotSwappable."""
    if not to_fused and _ORIGINAL in m.__dict__:
        return _restore(m), (), ()
    own = _own_methods(m)
    if own:
        raise NotSwappable(f"its class defines {', '.join(own)}, which the "
                           f"{'fused' if to_fused else 'reference'} class would not have")
    spec = kind.spec(m)
    cls = _cls(kind.fused if to_fused else kind.reference)
    runs = kind.fused_runs if to_fused else None
    built, errors = [], []
    for cand in spec.candidates:
        try:
            built.append((cand, _build(m, cls, spec.args, cand.kwargs, runs)))
        except NotSwappable as e:
            errors.append(str(e))
    if not built:
        raise NotSwappable(errors[0])
    best, notes = _probe(m, built, spec)
    notes = notes if to_fused else []  # the notes describe the fused module
    cand, new = built[best]
    hooks = _carry_hooks(m, new)
    if hooks:
        notes.append(f"carried over {hooks}")
    new.__dict__[_ORIGINAL] = m
    options = tuple((k, v) for k, v in cand.kwargs.items() if k != "activation")
    return new, options, tuple(notes)


def _carry_hooks(old: nn.Module, new: nn.Module) -> str:
    counts = []
    for attr in _hook_dicts(old):
        new.__dict__[attr] = old.__dict__[attr]  # the same dict: RemovableHandles keep working
        if old.__dict__[attr] and not attr.endswith(("_with_kwargs", "_always_called")):
            counts.append(f"{len(old.__dict__[attr])} {attr.strip('_').replace('_', ' ')[:-1]}(s)")
    if "_is_full_backward_hook" in old.__dict__:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    return ", ".join(counts)


def _restore(m: nn.Module) -> nn.Module:
    """The original module kept by swap, holding ``m``'s current Parameters, buffers, hooks and mode."""
    original = m.__dict__[_ORIGINAL]
    built = m.__dict__.get(_BUILT, frozenset())
    for name, child in m._modules.items():
        if name in built:  # swap's own child holding the original child's tensors: give them (and modes) back
            _adopt_tensors(original._modules[name], child)
        elif name in original._modules and child is not None and original._modules[name] is not child:
            original._modules[name] = child  # a child the user replaced on the fused module meanwhile
    current = dict(m.named_parameters())
    current.update(m.named_buffers())
    for name, tensor in current.items():  # Parameters re-assigned meanwhile (e.g. ``.to()`` that replaces them)
        owner_name, _, leaf = name.rpartition(".")
        owner = original.get_submodule(owner_name) if owner_name else original
        store = owner._parameters if leaf in owner._parameters else owner._buffers
        if store.get(leaf) is not tensor:
            store[leaf] = tensor
    for attr in _hook_dicts(m):
        original.__dict__[attr] = m.__dict__[attr]
    original.training = m.training
    for name, child in original._modules.items():
        if name not in m._modules and child is not None:
            child.train(m.training)
    return original


def _walk(model: nn.Module, *, inplace: bool, to_fused: bool, dry_run: bool, strict: bool) -> SwapResult:
    if not isinstance(model, nn.Module):
        raise ValueError(f"swap/unswap expect a torch.nn.Module; got {type(model).__name__}")
    for flag, name in ((inplace, "inplace"), (dry_run, "dry_run"), (strict, "strict")):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool; got {flag!r}")
    if not inplace and not dry_run:
        model = copy.deepcopy(model)
    planned: dict = {}  # id(old) -> (new, options, notes) or NotSwappable, so a shared module stays shared
    changes, replaced, skipped = [], [], []

    def visit(parent, attr: str, m: nn.Module, qual: str):
        kind = _classify(m, to_fused)
        if kind is not None:
            if id(m) not in planned:
                try:
                    planned[id(m)] = _convert(m, kind, to_fused)
                except NotSwappable as e:
                    planned[id(m)] = e
            found = planned[id(m)]
            if not isinstance(found, NotSwappable):
                new, options, notes = found
                replaced.append(Replacement(qual, _type_name(m), _type_name(new), options, notes))
                changes.append((parent, attr, new))
                return
            skipped.append(Skipped(qual, _type_name(m), str(found)))
        for name, child in list(m._modules.items()):
            if child is not None:
                visit(m, name, child, f"{qual}.{name}" if qual else name)

    visit(None, "", model, "")
    what = "swap" if to_fused else "unswap"
    if skipped and strict:
        raise ValueError(f"{what}(strict=True): {len(skipped)} module(s) cannot be replaced without changing the "
                         "model's maths (nothing was changed):\n" + "\n".join(f"  {s}" for s in skipped))
    result = SwapResult(replaced, model=model, skipped=skipped, dry_run=dry_run)
    if not dry_run:
        for parent, attr, new in changes:
            if parent is None:
                result.model = new
            else:
                setattr(parent, attr, new)
    if skipped:
        warnings.warn(f"attnfast.{what} left {len(skipped)} module(s) unchanged:\n"
                      + "\n".join(f"  {s}" for s in skipped)
                      + f"\n({what}(model, dry_run=True).skipped lists them; strict=True raises instead)",
                      SwapWarning, stacklevel=3)
    return result


def swap(model: nn.Module, *, inplace: bool = True, dry_run: bool = False, strict: bool = False) -> SwapResult:
    """Replace attention modules with fused twins that compute the same; see the module doc.

    Each candidate is probed (forward and backward, train and eval, own and perturbed parameters; tolerance
    ``max|new - old| <= rtol * max(max|old|, 0.01 * M)`` per output and gradient, M the largest of the group,
    with rtol 1e-5 / 2e-3 / 1e-2 / 5e-2 for float64 / float32 / float16 / bfloat16, at least twice the original's
    own rounding error for half precision) and replaced only if a fused configuration matches. The fused module
    adopts the original's Parameters, buffers, children and hooks (optimizers and ``state_dict`` keys stay valid).
    Candidates left alone are in ``result.skipped`` and one :class:`SwapWarning`; ``dry_run=True`` changes
    nothing; ``strict=True`` raises ``ValueError`` instead of skipping; ``inplace=False`` works on a deep copy.
    A SAGAN layer that returned ``(out, attention)`` returns ``(out, None)`` (noted in the result).
    """
    return _walk(model, inplace=inplace, to_fused=True, dry_run=dry_run, strict=strict)


def unswap(model: nn.Module, *, inplace: bool = True, dry_run: bool = False, strict: bool = False) -> SwapResult:
    """Undo :func:`swap`: each fused module becomes the original module object it replaced (same Parameters).

    A fused module that swap did not create (``attention="fused"`` models) becomes the plain-PyTorch reference
    class, adopting its Parameters after the same probe; configurations the reference cannot express (``pool``,
    ``heads``, ``value_dim``) are skipped. Same options and report as :func:`swap`.
    """
    return _walk(model, inplace=inplace, to_fused=False, dry_run=dry_run, strict=strict)


__all__ = ["swap", "unswap", "Replacement", "Skipped", "SwapResult", "SwapWarning", "Kind", "KINDS"]
