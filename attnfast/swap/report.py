"""What swap/unswap return and warn: :class:`SwapResult` (a list of :class:`Replacement`), :class:`Skipped`,
:class:`SwapWarning`."""
from __future__ import annotations

import dataclasses


class NotSwappable(Exception):
    """Raised by a family's ``spec``/``build`` or by the probe: the layer cannot be replaced (the reason).
    ``status``: how the report files it (``Skipped.status``; default: the family's own)."""

    def __init__(self, reason: str, status: str | None = None):
        super().__init__(reason)
        self.status = status


# Skipped.status values: why a layer was left alone
REFUSED = "refused"  # a family with a fused module, but this layer cannot be replaced (checks or probe)
NO_OP = "no fused op"  # a recognised family whose fused op does not exist yet
PARTIAL = "partly fusable"  # a recognised family of which only a step could be fused; swap leaves it whole
OUT_OF_SCOPE = "out of scope"  # a recognised family swap does not fuse by design (channel-only gates)
UNKNOWN = "unknown"  # looks like attention, but no family recognises it


@dataclasses.dataclass(frozen=True)
class Replacement:
    name: str  # qualified name in the model ("" for the root)
    old_type: str
    new_type: str
    options: tuple = ()  # (name, value) pairs of the new module's configuration chosen by the probe
    notes: tuple = ()  # what a user should know (deliberate differences, carried hooks)
    family: str = ""  # the family (registry name) that matched


@dataclasses.dataclass(frozen=True)
class Skipped:
    name: str
    type: str
    reason: str
    family: str = ""  # the family that recognised it ("" when none did)
    status: str = REFUSED

    def __str__(self) -> str:
        return f"{self.name or '<root>'} ({self.type}): {self.reason}"


class SwapResult(list):
    """A list of :class:`Replacement`; ``.skipped`` lists layers left alone, ``.model`` holds the result."""

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
        lines += [f"  left alone [{s.status}] {s}" for s in self.skipped]
        return "\n".join(lines)


class SwapWarning(UserWarning):
    """Emitted once per swap/unswap call that left layers alone."""


__all__ = ["Replacement", "Skipped", "SwapResult", "SwapWarning", "REFUSED", "NO_OP", "PARTIAL", "OUT_OF_SCOPE",
           "UNKNOWN"]
