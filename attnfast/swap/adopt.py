"""Parameter adoption: a fused module that holds the original's children, Parameters, buffers and hooks (nothing
copied or moved), and ``unswap``'s way back to the original object."""
from __future__ import annotations

import torch
import torch.nn as nn

from .report import NotSwappable

ORIGINAL = "_attnfast_swapped_from"  # the original module, kept on the fused one for unswap
BUILT = "_attnfast_built_children"  # children swap built (another library's class) and gave adopted tensors
SHARED = "_attnfast_shared_attributes"  # public attributes the original and the fused module share
_KEEP_METHODS = {"forward", "extra_repr"}


def type_name(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def is_ours(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "attnfast"


def own_methods(m: nn.Module) -> list:
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


def has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, attr, None) for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                   "_backward_pre_hooks"))


def hook_dicts(m: nn.Module) -> list:
    return [k for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict)]


def adopt_tensors(mine: nn.Module, theirs: nn.Module) -> None:
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


def build_by_adoption(old: nn.Module, cls, args: tuple, kwargs: dict) -> nn.Module:
    """``cls(*args, **kwargs)`` built on the meta device (nothing allocated), holding ``old``'s children (or, for a
    child of another library's class, its Parameters and buffers), Parameters and buffers."""
    try:
        with torch.device("meta"):
            new = cls(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise NotSwappable(f"{cls.__name__}{args} does not accept these options: {e}") from None
    built = set()
    for name, child in new._modules.items():
        theirs = old._modules.get(name)
        if child is None or theirs is None:
            continue
        if type(theirs) is type(child):
            new._modules[name] = theirs  # the child itself: its hooks and attributes stay
        else:  # another library's class for the same layer (timm's): adopt its Parameters and buffers
            adopt_tensors(child, theirs)
            built.add(name)
    new.__dict__[BUILT] = frozenset(built)  # unswap gives these back to the original's own children
    for store in ("_parameters", "_buffers"):
        mine, theirs = getattr(new, store), getattr(old, store)
        for name in mine:
            if name in theirs:
                mine[name] = theirs[name]
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set) & set(new._buffers)
    return new


def _tensors(m: nn.Module) -> dict:
    named = dict(m.named_parameters())
    named.update(m.named_buffers())
    return named


def finish(old: nn.Module, new: nn.Module, runs: frozenset | None) -> nn.Module:
    """Check that ``new`` holds exactly ``old``'s tensors under the same names (state_dict keys included) and that
    no hook would silently stop running; set train/eval flags and copy ``old``'s public attributes."""
    old_named, new_named = _tensors(old), _tensors(new)
    if set(new_named) != set(old_named):
        raise NotSwappable(f"parameters/buffers differ from the fused module's: "
                           f"{sorted(set(new_named) ^ set(old_named))}")
    if any(new_named[n] is not old_named[n] for n in old_named):
        raise NotSwappable("its parameters could not be adopted as they are")
    if set(new.state_dict().keys()) != set(old.state_dict().keys()):
        raise NotSwappable("its state_dict keys would change")
    adopted = {n for n, c in new._modules.items() if c is not None and old._modules.get(n) is c}
    # hooks on children that the new module never calls would silently stop running
    not_run = [n for n in old._modules if n not in adopted or (runs is not None and n not in runs)]
    for name in not_run:
        child = old._modules[name]
        for sub_name, sub in (child.named_modules(prefix=name) if child is not None else ()):
            if has_hooks(sub):
                raise NotSwappable(f"{sub_name} has hooks, which would not run: the {type(new).__name__} does "
                                   f"not call {name}")
    new.training = old.training
    for name, child in new._modules.items():
        if name not in adopted and child is not None and name not in old._modules:
            child.train(old.training)
    shared = []  # public attributes meaning the same on both: unswap gives their current values back
    for key, value in vars(old).items():
        if key.startswith("_") or key == "training":
            continue
        if not hasattr(new, key) and not is_ours(old):
            new.__dict__[key] = value
        if key in new.__dict__ and _same_value(new.__dict__[key], value):
            shared.append(key)
    new.__dict__[SHARED] = tuple(shared)
    return new


def _same_value(a, b) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - tensors, arrays, objects with odd __eq__: not the same
        return False


def carry_hooks(old: nn.Module, new: nn.Module) -> str:
    counts = []
    for attr in hook_dicts(old):
        new.__dict__[attr] = old.__dict__[attr]  # the same dict: RemovableHandles keep working
        if old.__dict__[attr] and not attr.endswith(("_with_kwargs", "_always_called")):
            counts.append(f"{len(old.__dict__[attr])} {attr.strip('_').replace('_', ' ')[:-1]}(s)")
    if "_is_full_backward_hook" in old.__dict__:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    return ", ".join(counts)


def restore(m: nn.Module) -> nn.Module:
    """The original module kept by swap, holding ``m``'s current Parameters, buffers, hooks and mode."""
    original = m.__dict__[ORIGINAL]
    built = m.__dict__.get(BUILT, frozenset())
    for name, child in m._modules.items():
        if name in built:  # swap's own child holding the original child's tensors: give them (and modes) back
            adopt_tensors(original._modules[name], child)
        elif name in original._modules and child is not None and original._modules[name] is not child:
            original._modules[name] = child  # a child the user replaced on the fused module meanwhile
    for name, tensor in _tensors(m).items():  # Parameters re-assigned meanwhile (e.g. ``.to()`` that replaces them)
        owner_name, _, leaf = name.rpartition(".")
        owner = original.get_submodule(owner_name) if owner_name else original
        store = owner._parameters if leaf in owner._parameters else owner._buffers
        if store.get(leaf) is not tensor:
            store[leaf] = tensor
    for key in m.__dict__.get(SHARED, ()):
        if key in m.__dict__:
            original.__dict__[key] = m.__dict__[key]
    for attr in hook_dicts(m):
        original.__dict__[attr] = m.__dict__[attr]
    original.training = m.training
    for name, child in original._modules.items():
        if name not in m._modules and child is not None:
            child.train(m.training)
    return original
