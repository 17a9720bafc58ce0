"""The walk: find each layer's family, build and probe the fused module, replace, report."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from . import families as registry
from .adopt import ORIGINAL, build_by_adoption, carry_hooks, finish, own_methods, restore, type_name
from .family import FUSED, Family, NotSwappable
from .probe import probe
from .reads import forward_reads
from .report import NO_OP, OUT_OF_SCOPE, PARTIAL, UNKNOWN, Replacement, Skipped, SwapResult, SwapWarning
from .scan import MAX_LAYER_SIZE, attention_like, layer_count

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
_ALWAYS_READABLE = {"training", "forward"}
# how far a family got with a layer; the report gives the furthest family's reason
_STAGE_METHODS, _STAGE_SPEC, _STAGE_BUILD, _STAGE_READS = range(4)


class _Refusal(NotSwappable):
    def __init__(self, reason: str, family: Family, status: str | None, stage: int):
        super().__init__(reason, status)
        self.family, self.stage = family, stage


def _fused_classes() -> tuple:
    return tuple({f.fused for f in registry.FAMILIES if f.fused is not None})


def is_fused(m: nn.Module) -> bool:
    """An instance of a fused class (swap made it, or the user did): never a candidate, never reported."""
    return isinstance(m, _fused_classes())


def check_reads(m: nn.Module, new: nn.Module, family: Family) -> None:
    """NotSwappable when the layer's forward reads state the fused module does not use (attnfast.swap.reads)."""
    if type(m).__module__.split(".")[0] == "attnfast":
        return  # attnfast's own classes: their fused twins read the same attributes
    reads = forward_reads(type(m))
    if reads.unknown:
        raise NotSwappable(f"which attributes its forward reads cannot be told ({reads.unknown[0]}), so the probe "
                           "cannot vouch for later values of them")
    allowed = set(new._modules) | set(new._parameters) | set(new._buffers) | set(family.reads)
    extra = sorted(reads.attrs - allowed - _ALWAYS_READABLE - reads.methods)
    if extra:
        names = ", ".join(f"self.{n}" for n in extra)
        raise NotSwappable(f"its forward reads {names}, which the fused {type(new).__name__} does not use: the probe "
                           "could only check the current value (changing it after a swap would have no effect)")


def _attempt(m: nn.Module, family: Family, autocast: tuple):
    """(new module, options, notes) for one family, or raise _Refusal."""
    stage = _STAGE_METHODS
    try:
        own = [n for n in own_methods(m) if n not in family.tolerated_methods]
        if own:
            raise NotSwappable(f"its class defines {', '.join(own)}, which the fused class would not have")
        stage = _STAGE_SPEC
        spec = family.spec(m)
        stage = _STAGE_BUILD
        built, errors = [], []
        for cand in spec.candidates:
            try:
                built.append((cand, finish(m, family.build(m, spec, cand), family.fused_runs)))
            except NotSwappable as e:
                errors.append(e)
        if not built:
            raise errors[0]
        stage = _STAGE_READS
        check_reads(m, built[0][1], family)
        stage += 1
        best, notes = probe(m, built, spec, autocast)
    except NotSwappable as e:
        raise _Refusal(str(e), family, e.status, stage) from None
    cand, new = built[best]
    notes = list(notes) + list(spec.notes)
    dropped = [n for n in own_methods(m) if n in family.tolerated_methods]
    if dropped:
        notes.append(f"{', '.join(dropped)} (the original's method) is not carried over")
    hooks = carry_hooks(m, new)
    if hooks:
        notes.append(f"carried over {hooks}")
    new.__dict__[ORIGINAL] = m
    options = tuple((k, v) for k, v in cand.kwargs.items() if k != "activation")
    return new, options, tuple(notes)


def _to_fused(m: nn.Module, families: list, autocast: tuple):
    """(family, new, options, notes) for the first family that gets through its probe, or raise _Refusal."""
    refusals = []
    for family in families:
        if family.status != FUSED:
            if refusals:
                break  # a fused family recognised it first: its reason is the one to give
            what = {NO_OP: "no fused op yet", PARTIAL: "only partly fusable", OUT_OF_SCOPE: "out of scope"}
            raise _Refusal(f"recognised as {family.title} ({what.get(family.status, family.status)}): "
                           f"{family.explain(m)}", family, family.status, -1)
        try:
            return (family, *_attempt(m, family, autocast))
        except _Refusal as e:
            if e.stage > _STAGE_READS:  # the probe's verdict is final: another layout computes the same
                raise
            refusals.append(e)
    raise max(refusals, key=lambda e: e.stage)  # the furthest; on ties the first (max keeps the first)


def _to_reference(m: nn.Module):
    """(family, module, options, notes) for unswap, or None when ``m`` is not swap's nor a fused class's."""
    if ORIGINAL in m.__dict__ and is_fused(m):  # (a reference module unswap made keeps its fused original too)
        return None, restore(m), (), ()
    for family in registry.FAMILIES:
        if family.fused is not None and family.reference is not None and isinstance(m, family.fused):
            try:
                spec = family.spec(m)
                built = [(c, finish(m, build_by_adoption(m, family.reference, spec.args, c.kwargs), None))
                         for c in spec.candidates]
                best, _ = probe(m, built, spec)
            except NotSwappable as e:
                raise _Refusal(str(e), family, None, _STAGE_BUILD) from None
            cand, new = built[best]
            notes = [f"carried over {h}"] if (h := carry_hooks(m, new)) else []
            new.__dict__[ORIGINAL] = m
            return family, new, tuple((k, v) for k, v in cand.kwargs.items() if k != "activation"), tuple(notes)
    return None


def _check_autocast(autocast) -> tuple:
    if autocast is None or autocast is False:
        return ()
    items = tuple(autocast) if isinstance(autocast, (tuple, list)) else (autocast,)
    for dt in items:
        if dt not in _AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, torch.bfloat16, torch.float16 or a tuple of them; got "
                             f"{autocast!r}")
    return tuple(dict.fromkeys(items))


def _walk(model: nn.Module, *, inplace: bool, to_fused: bool, dry_run: bool, strict: bool,
          autocast=None, stacklevel: int = 3) -> SwapResult:
    if not isinstance(model, nn.Module):
        raise ValueError(f"swap/unswap expect a torch.nn.Module; got {type(model).__name__}")
    for flag, name in ((inplace, "inplace"), (dry_run, "dry_run"), (strict, "strict")):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool; got {flag!r}")
    amp = _check_autocast(autocast)
    if not inplace and not dry_run:
        model = copy.deepcopy(model)
    planned: dict = {}  # id(old) -> (family, new, options, notes) or _Refusal, so a shared module stays shared
    changes, replaced, skipped = [], [], []
    claimed: set = set()  # ids of modules recognised (replaced or reported) and of fused ones

    def visit(parent, attr: str, m: nn.Module, qual: str):
        if to_fused:
            if is_fused(m):
                claimed.add(id(m))
                return
            families = [f for f in registry.FAMILIES if f.matches(m)]
            if families and id(m) not in planned:
                try:
                    planned[id(m)] = _to_fused(m, families, amp)
                except _Refusal as e:
                    planned[id(m)] = e
        elif id(m) not in planned:
            try:
                planned[id(m)] = _to_reference(m)
            except _Refusal as e:
                planned[id(m)] = e
        found = planned.get(id(m))
        if isinstance(found, _Refusal):
            status = found.status or found.family.skip_status()
            skipped.append(Skipped(qual, type_name(m), str(found), found.family.name, status))
            claimed.add(id(m))
            return
        if found is not None:
            family, new, options, notes = found
            replaced.append(Replacement(qual, type_name(m), type_name(new), options, notes,
                                        family.name if family else ""))
            changes.append((parent, attr, new))
            claimed.add(id(m))
            return
        for name, child in list(m._modules.items()):
            if child is not None:
                visit(m, name, child, f"{qual}.{name}" if qual else name)

    visit(None, "", model, "")
    if to_fused:
        skipped = _ordered(model, skipped + _unrecognised(model, claimed))
    what = "swap" if to_fused else "unswap"
    if skipped and strict:
        raise ValueError(f"{what}(strict=True): {len(skipped)} attention layer(s) would be left as they are "
                         "(nothing was changed):\n" + "\n".join(f"  [{s.status}] {s}" for s in skipped))
    result = SwapResult(replaced, model=model, skipped=skipped, dry_run=dry_run)
    if not dry_run:
        for parent, attr, new in changes:
            if parent is None:
                result.model = new
            else:
                setattr(parent, attr, new)
    if skipped:
        warnings.warn(f"attnfast.{what} left {len(skipped)} attention layer(s) as they are:\n"
                      + "\n".join(f"  [{s.status}] {s}" for s in skipped)
                      + f"\n({what}(model, dry_run=True).skipped lists them; strict=True raises instead)",
                      SwapWarning, stacklevel=stacklevel)
    return result


def _unrecognised(model: nn.Module, claimed: set) -> list:
    """Skipped entries for attention-like layers no family recognised (attnfast.swap.scan)."""
    found = []
    holds_claimed: dict = {}

    def has_claimed(m: nn.Module) -> bool:
        if id(m) not in holds_claimed:
            holds_claimed[id(m)] = id(m) in claimed or any(
                has_claimed(c) for c in m._modules.values() if c is not None)
        return holds_claimed[id(m)]

    def visit(m: nn.Module, qual: str):
        if id(m) in claimed:
            return
        why = attention_like(m, root=m is model)
        if why is not None and not has_claimed(m) and layer_count(m) <= MAX_LAYER_SIZE:
            found.append(Skipped(qual, type_name(m), f"looks like attention ({why}) but is no layout swap knows; "
                                 "left alone", "", UNKNOWN))
            return
        for name, child in m._modules.items():
            if child is not None:
                visit(child, f"{qual}.{name}" if qual else name)

    visit(model, "")
    return found


def _ordered(model: nn.Module, skipped: list) -> list:
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return sorted(skipped, key=lambda s: order.get(s.name, len(order)))


def swap(model: nn.Module, *, inplace: bool = True, dry_run: bool = False, strict: bool = False,
         autocast=None) -> SwapResult:
    """Replace attention layers with fused modules that compute the same; see ``attnfast.swap``'s doc.

    Each layer a family recognises is probed (forward and backward, train and eval, own and perturbed
    parameters, against a float64 run of the original; ``autocast=torch.bfloat16`` (or float16, or a tuple) also
    under ``torch.autocast`` with that dtype) and replaced only if a fused configuration matches. The fused module
    adopts the original's Parameters, buffers, children and hooks (optimizers and ``state_dict`` keys stay
    valid). Layers left alone (refused, recognised without a fused op, out of scope, or attention-like but
    unknown) are in ``result.skipped`` and one :class:`SwapWarning`; ``dry_run=True`` changes nothing;
    ``strict=True`` raises ``ValueError`` (changing nothing) if any layer would be left alone; ``inplace=False``
    works on a deep copy.
    """
    return _walk(model, inplace=inplace, to_fused=True, dry_run=dry_run, strict=strict, autocast=autocast)


def unswap(model: nn.Module, *, inplace: bool = True, dry_run: bool = False, strict: bool = False) -> SwapResult:
    """Undo :func:`swap`: each fused module becomes the original module object it replaced (same Parameters).

    A fused module that swap did not create (``attention="fused"`` models) becomes the plain-PyTorch reference
    class, adopting its Parameters after the same probe; configurations the reference cannot express (``pool``,
    ``heads``, ``value_dim``) are skipped. Same options and report as :func:`swap`.
    """
    return _walk(model, inplace=inplace, to_fused=False, dry_run=dry_run, strict=strict)


__all__ = ["swap", "unswap", "is_fused", "check_reads"]
