"""The :class:`Family` base class every family file subclasses, and the helpers matchers share.

See the package docstring (``attnfast.swap``) for the template of a family file.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch
import torch.nn as nn

from .adopt import build_by_adoption
from .report import REFUSED, NotSwappable

FUSED = "fused"  # Family.status of a family swap replaces


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration of the fused module to probe."""

    kwargs: dict
    dropped: tuple = ()  # output positions where one side may return None for the other's tensor
    note: str = ""  # reported when a dropped position held a tensor (or always, for a candidate without drops)


@dataclasses.dataclass
class Spec:
    args: tuple  # positional constructor arguments of the fused class (what ``Family.build`` passes on)
    candidates: list  # of Candidate (keyword arguments on top of ``args``)
    inputs: Callable  # (generator, dtype, device) -> tuple of probe inputs (batch 2)
    notes: tuple = ()  # reported with the replacement whichever candidate wins


class Family:
    """One source layout of one attention layer. Subclass it in one file under ``attnfast/swap/families/`` and
    list an instance in ``families.FAMILIES``; see the package docstring for what each attribute means."""

    name: str = ""  # registry name, reported in Replacement.family / Skipped.family
    title: str = ""  # what users call the layer and where it comes from
    status: str = FUSED  # FUSED, or NO_OP / PARTIAL / OUT_OF_SCOPE: recognised and reported, never replaced
    fused: type | None = None  # the fused class swap builds (FUSED families)
    reference: type | None = None  # attnfast's plain class that unswap turns a directly built ``fused`` into
    fused_runs: frozenset | None = None  # the original's children whose forward the fused module calls (None: all)
    reads: frozenset = frozenset()  # attributes besides children/Parameters/buffers that the original's forward
    #                                 may read: ones the fused module reads itself, or fixed ones ``spec`` checks
    tolerated_methods: frozenset = frozenset()  # public methods of the user's class that may be dropped (noted)

    def matches(self, m: nn.Module) -> bool:
        """Cheap structural test: is ``m`` this family's layer? (Then it is swapped or reported, never silent.)"""
        raise NotImplementedError

    def spec(self, m: nn.Module) -> Spec:
        """The fused configurations that could express ``m`` and the probe input; ``NotSwappable(reason)`` if
        none can (say what differs)."""
        raise NotImplementedError

    def build(self, m: nn.Module, spec: Spec, candidate: Candidate) -> nn.Module:
        """The fused module for ``candidate``, holding ``m``'s own children, Parameters and buffers. The default
        constructs ``fused(*spec.args, **candidate.kwargs)`` on the meta device and adopts ``m``'s tensors."""

        return build_by_adoption(m, self.fused, spec.args, candidate.kwargs)

    def explain(self, m: nn.Module) -> str:
        """The report text for a family that is not FUSED (why the layer stays as it is)."""
        return ""

    def skip_status(self) -> str:
        return REFUSED if self.status == FUSED else self.status

    def __repr__(self) -> str:
        return f"<swap family {self.name!r}: {self.title}>"


# ----------------------------------------------------------------------------------------------
# helpers for matchers and specs
# ----------------------------------------------------------------------------------------------
def has_modules(m: nn.Module, *names: str) -> bool:
    return all(isinstance(m._modules.get(n), nn.Module) for n in names)


def is_plain_conv(m) -> bool:
    """An ``nn.Conv2d`` itself: not a subclass (``ParametrizedConv2d``, BigGAN's ``SNConv2d``), no ``weight_orig``
    (``nn.utils.spectral_norm``'s hook)."""
    return type(m) is nn.Conv2d and "weight" in m._parameters


def is_conv1x1(m) -> bool:
    return (isinstance(m, nn.Conv2d) and (m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
            == ((1, 1), (1, 1), (0, 0), (1, 1), 1))


def require_conv1x1(m, name: str, bias: bool | None, out_channels: int | None = None,
                    plain: bool = True) -> nn.Conv2d:
    """``m`` is a 1x1, stride-1, unpadded, ungrouped convolution (``plain``: an ``nn.Conv2d`` itself);
    ``bias`` None accepts either."""
    if plain:
        require_plain_conv(m, name)
        if type(m) is not nn.Conv2d:
            raise NotSwappable(f"{name} is {type(m).__name__}, not an nn.Conv2d")
    if not isinstance(m, nn.Conv2d):
        raise NotSwappable(f"{name} is {type(m).__name__}, not a Conv2d")
    if not is_conv1x1(m):
        raise NotSwappable(f"{name} is not a plain 1x1 convolution (kernel {m.kernel_size}, stride {m.stride}, "
                           f"padding {m.padding}, dilation {m.dilation}, groups {m.groups})")
    if bias is not None and (m.bias is not None) != bias:
        raise NotSwappable(f"{name} {'has no' if bias else 'has a'} bias; the fused module's {name} "
                           f"{'has one' if bias else 'has none'}")
    if out_channels is not None and m.out_channels != out_channels:
        raise NotSwappable(f"{name} has {m.out_channels} output channels; expected {out_channels}")
    return m


def require_tensors(m: nn.Module, expected: set) -> None:
    names = {n for n, _ in m.named_parameters()} | {n for n, _ in m.named_buffers()}
    if names != expected:
        extra, missing = sorted(names - expected), sorted(expected - names)
        parts = [f"extra {', '.join(extra)}"] if extra else []
        parts += [f"missing {', '.join(missing)}"] if missing else []
        raise NotSwappable(f"parameters/buffers differ from the fused module's: {'; '.join(parts)}")


def require_plain_conv(m, name: str) -> None:
    """``nn.utils.spectral_norm``, parametrizations and Conv2d subclasses are the user's own projections: a family
    that reads the weights itself (instead of calling the conv) cannot honour them."""
    if hasattr(m, "parametrizations"):
        raise NotSwappable(f"{name} has parametrizations ({', '.join(m.parametrizations.keys())}); the fused "
                           "module reads its weight directly")
    if "weight_orig" in m._parameters:
        raise NotSwappable(f"{name} has spectral norm (weight_orig); the fused module reads its weight directly")


def randn(gen, dtype, device, *shape):
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


def loaded_class(module: str, name: str):
    """``module.name`` if that module is already imported (else None): a model holding timm's or MONAI's layers
    has imported them, so matching their classes never imports a package (nor needs it installed)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def is_instance_of_loaded(m, module: str, *names: str) -> bool:
    classes = tuple(c for c in (loaded_class(module, n) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(m, classes)


__all__ = ["Family", "Candidate", "Spec", "NotSwappable", "FUSED", "has_modules", "is_plain_conv", "is_conv1x1",
           "require_conv1x1", "require_tensors", "require_plain_conv", "randn", "loaded_class",
           "is_instance_of_loaded"]
