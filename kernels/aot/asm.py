"""Static evidence read from a compiled Triton kernel, without a GPU: what the AOT table reports.

Inputs are the texts ``triton.compile`` leaves in ``compiled.asm`` (``ttgir``, ``ptx``) and the SASS
of its cubin (``cuobjdump --dump-sass``):

- ``ttgir_dots``: every dot of the final TTGIR (after software pipelining, which may have split one
  source dot into several ops): its M, N, K, its source site and its MMA layout.
- ``ptx_mmas``: every tensor-core instruction of the PTX (``mma.sync`` or ``wgmma.mma_async``), its
  m, n, k and the source site of the ``.loc`` in force.
- ``mma_evidence``: per dot site, the MMA work each warp issues against the tile's minimum (the
  rule is in its docstring), and the kernel's MMA family.
- ``ptx_atomics``: atom/red instructions by memory order, and ordering fences.
- ``sass_spill_bytes``: bytes of the local-memory stores and loads (``STL``/``LDL``) in the SASS.

A *site* is the innermost ``file:line:col`` of a ``tl.dot`` call (inlined helpers resolve to the
helper's own line), the same key on both sides: TTGIR ``loc`` chains and PTX ``.loc`` directives.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

# ----------------------------------------------------------------------------------------------
# TTGIR
# ----------------------------------------------------------------------------------------------
_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)
_FILE_LOC = re.compile(r'^"([^"]+)":(\d+):(\d+)$')
_NAME_LOC = re.compile(r'^"[^"]*"\((.*)\)$')
_CALLSITE = re.compile(r"^callsite\((#loc\d*) at (#loc\d*)\)$")
_FUSED = re.compile(r"^fused(?:<[^>]*>)?\[(#loc\d*)")
_MMA_LAYOUT = re.compile(r"^(#[\w.]+) = #\w+\.nvidia_mma<\{(.*)\}>", re.M)
_DOT_OP = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*:\s*(\S+<[^*]*?)\s\*\s(\S+<.*?)\s->\s*"
                     r"tensor<([\dx]+)x\w+,\s*(#[\w.]+)>\s*loc\((.*)\)\s*$")
_SHAPE = re.compile(r"<((?:\d+x)+)")


@dataclasses.dataclass(frozen=True)
class Dot:
    """One dot op of the TTGIR."""

    site: str  # "file.py:line:col"
    M: int
    N: int
    K: int
    version: int  # MMA layout major version: 2 (mma.sync), 3 (wgmma); 0: not an MMA layout (FMA)
    warps_per_cta: tuple
    instr_shape: tuple

    def repeat(self) -> int:
        """How many times the layout computes each output element: > 1 when the warps along M
        (16 rows each) or along N (``instrShape[1]`` columns each) span more than the tile."""
        if not self.version:
            return 1
        rows = self.warps_per_cta[0] * 16
        cols = self.warps_per_cta[1] * self.instr_shape[1]
        return max(1, rows // self.M) * max(1, cols // self.N)


def _site(path: str, line, col) -> str:
    return f"{os.path.basename(path)}:{line}:{col}"


def _resolve_loc(text: str, table: dict, depth: int = 0):
    """Innermost ``file:line:col`` of an MLIR location (``#locN`` or inline), or None."""
    text = text.strip()
    if depth > 64:
        return None
    if text.startswith("#loc"):
        return _resolve_loc(table[text], table, depth + 1) if text in table else None
    m = _FILE_LOC.match(text)
    if m:
        return _site(*m.groups())
    m = _NAME_LOC.match(text)
    if m:
        return _resolve_loc(m.group(1), table, depth + 1)
    m = _CALLSITE.match(text)
    if m:  # the callee's own line; compiler-generated (unknown) callees take the caller's
        return _resolve_loc(m.group(1), table, depth + 1) or _resolve_loc(m.group(2), table, depth + 1)
    m = _FUSED.match(text)
    if m:
        return _resolve_loc(m.group(1), table, depth + 1)
    return None


def _shape(typ: str) -> list:
    m = _SHAPE.search(typ)
    if not m:
        raise ValueError(f"cannot read a shape from TTGIR type {typ!r}")
    return [int(x) for x in m.group(1).rstrip("x").split("x")]


def _layout_fields(body: str) -> dict:
    out = {}
    for key in ("versionMajor",):
        m = re.search(rf"{key} = (\d+)", body)
        out[key] = int(m.group(1)) if m else 0
    for key in ("warpsPerCTA", "instrShape"):
        m = re.search(rf"{key} = \[([\d, ]+)\]", body)
        out[key] = tuple(int(x) for x in m.group(1).split(",")) if m else ()
    return out


def ttgir_dots(ttgir: str) -> list:
    """Every ``tt.dot`` / ``ttng.warp_group_dot`` of a TTGIR module, as ``Dot``s."""
    locs = dict(_LOC_DEF.findall(ttgir))
    layouts = {name: _layout_fields(body) for name, body in _MMA_LAYOUT.findall(ttgir)}
    dots = []
    for line in ttgir.splitlines():
        if "tt.dot " not in line and "ttng.warp_group_dot " not in line:
            continue
        m = _DOT_OP.search(line)
        if not m:
            raise ValueError(f"unrecognised TTGIR dot: {line.strip()[:300]}")
        _, a_type, b_type, out_shape, layout, loc = m.groups()
        a, b = _shape(a_type), _shape(b_type)
        out = [int(x) for x in out_shape.split("x")]
        lay = layouts.get(layout, {})
        dots.append(Dot(site=_resolve_loc(loc, locs) or "?", M=out[-2], N=out[-1], K=a[-1],
                        version=lay.get("versionMajor", 0), warps_per_cta=lay.get("warpsPerCTA", ()),
                        instr_shape=lay.get("instrShape", ())))
        if b[-2] != a[-1] or a[-2] != out[-2] or b[-1] != out[-1]:
            raise ValueError(f"inconsistent TTGIR dot shapes {a} x {b} -> {out}: {line.strip()[:300]}")
    return dots


# ----------------------------------------------------------------------------------------------
# PTX
# ----------------------------------------------------------------------------------------------
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_PTX_MMA = re.compile(r"^\s*(?:@!?%\w+\s+)?(wgmma\.mma_async|mma\.sync)\S*\.m(\d+)n(\d+)k(\d+)\b")
_PTX_ATOM = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:atom|red)\.[\w.:]+)")
_PTX_FENCE = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:fence|membar)\.[\w.:]+)")
_ORDERED = ("acq_rel", "acquire", "release", "sc")
_SEMANTICS = ("relaxed",) + _ORDERED


@dataclasses.dataclass(frozen=True)
class Mma:
    """One tensor-core instruction of the PTX."""

    site: str
    family: str  # "wgmma" or "mma.sync"
    m: int
    n: int
    k: int

    def work_per_warp(self) -> float:
        """Multiply-adds one warp contributes: a wgmma is issued by a warpgroup of 4 warps."""
        return self.m * self.n * self.k / (4 if self.family == "wgmma" else 1)


def ptx_mmas(ptx: str) -> list:
    """Every MMA instruction of the PTX, attributed to the ``.loc`` in force before it."""
    files = {}
    for line in ptx.splitlines():  # .file directives come at the end of the module
        m = _PTX_FILE.match(line)
        if m:
            files[m.group(1)] = m.group(2)
    site, out = "?", []
    for line in ptx.splitlines():
        m = _PTX_LOC.match(line)
        if m:
            f, ln, col = m.groups()
            site = _site(files.get(f, f"file{f}"), ln, col)
            continue
        m = _PTX_MMA.match(line)
        if m:
            fam = "wgmma" if m.group(1).startswith("wgmma") else "mma.sync"
            out.append(Mma(site, fam, int(m.group(2)), int(m.group(3)), int(m.group(4))))
    return out


def ptx_atomics(ptx: str) -> dict:
    """Atomics and fences of the PTX.

    ``forms``: instruction form -> count (e.g. ``atom.global.gpu.acq_rel.add.f32``); ``ordered``:
    atom/red whose memory semantics are acquire, release, acq_rel or sc (no ``.sem`` means
    ``.relaxed`` in PTX); ``fences``: ordering fences (``fence.sc``/``fence.acq_rel``/``membar``; the
    proxy fences around wgmma/TMA order nothing between threads and are not counted)."""
    forms, total, ordered, fences = {}, 0, 0, 0
    for line in ptx.splitlines():
        m = _PTX_ATOM.match(line)
        if m:
            form = m.group(1)
            forms[form] = forms.get(form, 0) + 1
            total += 1
            sem = [q for q in form.split(".") if q in _SEMANTICS]
            ordered += bool(sem and sem[0] in _ORDERED)
            continue
        m = _PTX_FENCE.match(line)
        if m and (m.group(1).startswith("membar") or any(f".{s}" in m.group(1) for s in _ORDERED)):
            fences += 1
            forms[m.group(1)] = forms.get(m.group(1), 0) + 1
    return {"total": total, "ordered": ordered, "fences": fences, "forms": dict(sorted(forms.items()))}


# ----------------------------------------------------------------------------------------------
# MMA work per warp vs the tile's minimum
# ----------------------------------------------------------------------------------------------
def mma_evidence(dots: list, mmas: list, num_warps: int) -> dict:
    """MMA family and per-site work of one kernel.

    Rule, per dot site s (the same source ``tl.dot``):

    - ``min_s``: the sum over the TTGIR dot ops at s of ``M*N*K / num_warps``: the multiply-adds
      each warp issues when the warps tile the M x N output without overlap. Pipelining that peels a
      loop iteration makes separate TTGIR ops, so both sides count the copy.
    - ``ptx_s``: the sum over the PTX MMA instructions at s of ``m*n*k``, divided by 4 for wgmma
      (one instruction per warpgroup of 4 warps). Static instructions: every warp runs the same code.
    - ``ratio_s = ptx_s / min_s`` is how many times each output element is computed: 1 when no warp
      repeats another's rows or columns.
    - ``layout_s``: what the TTGIR's MMA layouts predict, the ``min_s``-weighted mean over the site's
      ops of ``max(1, wpc[0]*16 / M) * max(1, wpc[1]*instrShape[1] / N)`` (warpsPerCTA ``wpc``: 16
      rows per warp along M, ``instrShape[1]`` columns along N). ``consistent`` holds when every site has
      ``ratio_s == layout_s`` and every PTX MMA belongs to a site: a loop body duplicated below the
      TTGIR (e.g. LLVM unrolling) or a misread would break it, so a copy can neither pass as a
      repeat nor hide one.

    ``family``: "wgmma", "mma.sync", "wgmma+mma.sync" (mixed), or "none(FMA)" (no tensor cores)."""
    sites = {}
    for d in dots:
        if not d.version:
            continue
        s = sites.setdefault(d.site, {"site": d.site, "dots": [], "min_work": 0.0, "ptx_work": 0.0,
                                      "count": 0, "family": set(), "layout_work": 0.0})
        s["dots"].append(f"{d.M}x{d.N}x{d.K} v{d.version} w{list(d.warps_per_cta)}")
        s["min_work"] += d.M * d.N * d.K / num_warps
        s["layout_work"] += d.M * d.N * d.K / num_warps * d.repeat()
    unattributed = 0
    for m in mmas:
        s = sites.get(m.site)
        if s is None:
            unattributed += 1
            continue
        s["ptx_work"] += m.work_per_warp()
        s["count"] += 1
        s["family"].add(m.family)
    families = set()
    rows, count, min_count = [], 0, 0.0
    for s in sites.values():
        fam = "+".join(sorted(s["family"], reverse=True)) or "none"
        families |= s["family"]
        ratio = s["ptx_work"] / s["min_work"] if s["min_work"] else 0.0
        per_instr = s["ptx_work"] / s["count"] if s["count"] else 0.0
        s_min = s["min_work"] / per_instr if per_instr else 0.0
        count += s["count"]
        min_count += s_min
        rows.append({"site": s["site"], "family": fam, "dots": s["dots"], "count": s["count"],
                     "min_count": round(s_min, 3), "ratio": round(ratio, 3),
                     "layout_repeat": round(s["layout_work"] / s["min_work"], 3)})
    if families:
        family = "+".join(sorted(families, reverse=True))
    else:
        family = "none(FMA)" if dots else "none"
    consistent = unattributed == 0 and all(math.isclose(r["ratio"], r["layout_repeat"]) for r in rows)
    return {"family": family, "count": count, "min_count": round(min_count, 3),
            "max_ratio": max((r["ratio"] for r in rows), default=0.0), "unattributed": unattributed,
            "consistent": consistent, "sites": sorted(rows, key=lambda r: r["site"])}


# ----------------------------------------------------------------------------------------------
# SASS
# ----------------------------------------------------------------------------------------------
_SASS_LOCAL = re.compile(r"\b(?:STL|LDL)((?:\.[A-Z0-9]+)*)\s")


def sass_spill_bytes(sass: str) -> int:
    """Bytes moved by the local-memory stores and loads (``STL``/``LDL``) in the SASS: what ptxas
    reports as ``bytes spill stores`` + ``bytes spill loads`` (Triton kernels have no local arrays)."""
    total = 0
    for m in _SASS_LOCAL.finditer(sass):
        q = m.group(1).split(".")
        if "128" in q:
            total += 16
        elif "64" in q:
            total += 8
        elif "U16" in q or "S16" in q:
            total += 2
        elif "U8" in q or "S8" in q:
            total += 1
        else:
            total += 4
    return total


def ptxas_log_spill_bytes(log: str):
    """``bytes spill stores`` + ``bytes spill loads`` of a ``ptxas -v`` log (None: none reported)."""
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    if not stores and not loads:
        return None
    return sum(map(int, stores)) + sum(map(int, loads))
