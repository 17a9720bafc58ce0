"""Static GPU evidence, read without a GPU from what Triton compiles for sm_80 and sm_90.

Every check reads the session's one AOT run (``aot_report`` in this folder's conftest): the TTGIR,
PTX and SASS of every registered configuration's binaries (``attnfast.kernels.aot.asm`` does the
reading). They fail when:

- an atomic is ordered (acquire / release / acq_rel / sc), or a kernel with atomics has an ordering
  fence: each is a GPU-wide fence in the grid backward's pixel loop; a kernel other than the grid
  backward's atomic build has atomics (the deterministic build has none);
- a 16-bit self-attention kernel (forward, dQ, dK/dV) does not use wgmma on sm_90;
- a warp repeats another's work: per dot site, the PTX's MMA work per warp exceeds the tile's minimum
  (``_asm.mma_evidence`` states the rule), or the count disagrees with the TTGIR's MMA layout;
- the committed table for this Triton version (``benchmarks/results/aot_evidence_triton-<version>``)
  no longer matches a fresh compile.

The fixture kernels (``aot_fixture_kernels.py``) show that the checks can fail: known-bad tiles and
default (acq_rel) atomics are flagged, known-good ones are not.
"""
import json
import os

import pytest
import triton

from attnfast.kernels.aot import asm as _asm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SELF_ATTENTION_MMA = ("self_attention.fwd[", "self_attention.bwd_dq[", "self_attention.bwd_dkdv[")


def _is_16bit(name: str) -> bool:
    return "[fp16" in name or "[bf16" in name


def _ok(results: dict) -> dict:
    return {k: r for k, r in results.items() if "error" not in r}


# ----------------------------------------------------------------------------------------------
# atomics
# ----------------------------------------------------------------------------------------------
def _ordered(r) -> bool:
    a = r["atomics"]
    return bool(a["ordered"] or (a["fences"] and a["total"]))


def test_no_ordered_atomics(registry_results):
    results = _ok(registry_results)
    with_atomics = [k for k, r in results.items() if r["atomics"]["total"]]
    assert any(name.startswith("grid_attention.bwd[") for name, _ in with_atomics), \
        "expected the grid backward's dGp atomics in the PTX: is the check reading the right code?"
    bad = [f"{name} sm_{cap}: {r['atomics']['forms']}" for (name, cap), r in sorted(results.items()) if _ordered(r)]
    assert not bad, "ordered atomics (a GPU-wide fence each; use sem='relaxed'):\n" + "\n".join(bad)


def test_only_the_grid_backward_has_atomics_and_not_its_deterministic_build(registry_results):
    """Atomics per binary, read from the PTX: the grid backward's dGp scatter is the only atomic in any
    kernel, and its deterministic build (``DZ_OUT``, taken under
    ``torch.use_deterministic_algorithms(True)``) has none."""
    results = _ok(registry_results)
    det = [k for k in results if "grid_attention.bwd[" in k[0] and ",det]" in k[0]]
    assert det, "no deterministic grid backward build in the AOT report"
    bad = [f"{name} sm_{cap}: {r['atomics']['forms']}" for (name, cap), r in sorted(results.items())
           if r["atomics"]["total"] and not (name.startswith("grid_attention.bwd[") and ",det]" not in name)]
    assert not bad, "atomics outside the grid backward's atomic build:\n" + "\n".join(bad)


def test_atomic_check_flags_the_default_atomic_add(fixture_results, fixture_kernels):
    for name, ordered in fixture_kernels.ATOMICS.items():
        for cap in (80, 90):
            r = fixture_results[(name, cap)]
            assert r["atomics"]["total"] > 0, (name, cap, r["atomics"])
            assert _ordered(r) == ordered, (name, cap, r["atomics"])


# ----------------------------------------------------------------------------------------------
# MMA family and repeated work
# ----------------------------------------------------------------------------------------------
def test_16bit_self_attention_uses_wgmma_on_sm90(registry_results):
    """Every MMA of the 16-bit self-attention forward, dQ and dK/dV kernels is a wgmma on sm_90."""
    results = _ok(registry_results)
    targets = {k: r for k, r in results.items() if k[1] == 90 and k[0].startswith(SELF_ATTENTION_MMA)
               and _is_16bit(k[0])}
    assert len({k[0].split("[")[0] for k in targets}) == 3, f"16-bit self-attention configs not found: {sorted(targets)}"
    bad = [f"{name}: {r['mma']['family']}" for (name, _), r in sorted(targets.items()) if r["mma"]["family"] != "wgmma"]
    assert not bad, "16-bit self-attention kernels without wgmma on sm_90:\n" + "\n".join(bad)


def _repeats(r) -> list:
    return [f"{s['site']} {s['dots']}: {s['ratio']:g}x ({s['count']} MMA/thread, minimum {s['min_count']:g})"
            for s in r["mma"]["sites"] if s["ratio"] > 1]


def test_no_warp_repeats_another_warps_rows(registry_results):
    """MMA instructions per thread (PTX) against the tile's minimum, per dot site: equal everywhere."""
    results = _ok(registry_results)
    assert any(r["mma"]["count"] for r in results.values()), "no MMA instruction found in any kernel"
    bad = [f"{name} sm_{cap} ({r['num_warps']} warps): " + "; ".join(_repeats(r))
           for (name, cap), r in sorted(results.items()) if r["mma"]["max_ratio"] > 1 and not name.startswith(KNOWN_REPEATS)]
    assert not bad, f"{len(bad)} compiles where warps repeat one another's MMA work:\n" + "\n".join(bad)
    known = {name.split("[")[0] for (name, _), r in results.items() if r["mma"]["max_ratio"] > 1}
    assert known <= {k.split("[")[0] for k in KNOWN_REPEATS}, known


# Known and recorded (benchmarks/results/kernel_tuning.md, "attention gate"): the attention gate's 16-pixel tiles
# (chosen on 2026-12-03 to end its spills) leave 4-8 warps sharing 16 MMA rows, so warps repeat one another's dots
# in its backward (and the fp32 TF32 forward at F=32): redundant work, not wrong results. Its tiles are to be
# retuned on a GPU. No other kernel may repeat.
KNOWN_REPEATS = ("attention_gate.bwd[", "attention_gate.bwd_weight[fp32", "attention_gate.fwd[fp32")


def test_mma_count_agrees_with_the_ttgir_layout(aot_report):
    """The PTX count per dot site equals what the TTGIR's MMA layout implies, and every MMA instruction
    belongs to a dot site: a duplicated loop body or a misread cannot pass as (or hide) a repeat."""
    bad = []
    for r in aot_report["results"]:
        if "error" in r:
            continue
        m = r["mma"]
        if not m["consistent"]:
            bad.append(f"{r['name']} sm_{r['cap']}: unattributed {m['unattributed']}, sites "
                       + "; ".join(f"{s['site']} ratio {s['ratio']} layout {s['layout_repeat']}" for s in m["sites"]))
        if m["family"] not in ("none", "none(FMA)") and not m["count"]:
            bad.append(f"{r['name']} sm_{r['cap']}: family {m['family']} without instructions")
    assert not bad, "\n".join(bad)


def test_repeat_check_on_known_tiles(fixture_results, fixture_kernels):
    """128x64 on 8 warps and 64x64 on 4 warps: every warp its own rows (ratio 1 at every dot); 64x64
    and 32x32 on 8 warps (the old self-attention forward and dQ/dK-dV tiles): flagged on both targets."""
    for name, (bm, bn, warps, repeats) in fixture_kernels.FLASH_TILES.items():
        for cap in (80, 90):
            r = fixture_results[(name, cap)]
            m = r["mma"]
            assert m["consistent"] and len(m["sites"]) == 2, (name, cap, m)
            assert (m["max_ratio"] > 1) == repeats, (name, cap, m)
            if not repeats:
                assert all(s["ratio"] == 1 for s in m["sites"]), (name, cap, m)
                assert m["count"] == m["min_count"], (name, cap, m)
            assert m["family"] == ("wgmma" if cap == 90 and bm >= 64 else "mma.sync"), (name, cap, m)


# ----------------------------------------------------------------------------------------------
# the readers on hand-written text (cheap; no compile)
# ----------------------------------------------------------------------------------------------
def test_ptx_atomic_semantics():
    ptx = "\n".join([
        "\t@%p1 atom.global.gpu.acq_rel.add.f32 %r1, [%rd1+0], %r2;",
        "\tatom.global.add.f32 %r3, [%rd2], %r4;",  # no .sem: relaxed
        "\t@!%p2 red.global.gpu.relaxed.add.f32 [%rd3], %r5;",
        "\tred.release.gpu.global.add.u32 [%rd4], 1;",
        "\tfence.proxy.async.shared::cta;",  # orders nothing between threads
        "\tfence.acq_rel.gpu;",
        "\tmembar.gl;",
    ])
    a = _asm.ptx_atomics(ptx)
    assert (a["total"], a["ordered"], a["fences"]) == (4, 2, 2), a


def test_sass_spill_bytes():
    sass = "\n".join([
        "        /*0100*/                   STL.64 [R1+0x8], R4 ;",
        "        /*0110*/                   STL [R1], R2 ;",
        "        /*0120*/                   LDL.LU.128 R8, [R1+0x10] ;",
        "        /*0130*/                   LDL.U8 R3, [R1+0x20] ;",
        "        /*0140*/                   LDG.E.64 R6, [R2.64] ;",
    ])
    assert _asm.sass_spill_bytes(sass) == 8 + 4 + 16 + 1
    assert _asm.ptxas_log_spill_bytes("    896 bytes stack frame, 948 bytes spill stores, 984 bytes spill loads") == 1932
    assert _asm.ptxas_log_spill_bytes("    0 bytes stack frame") is None


def test_ttgir_dot_sites_and_layouts():
    ttgir = "\n".join([
        '#loc = loc("/k/a.py":10:1)',
        "#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>",
        "#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 4], instrShape = [16, 8]}>",
        "%s = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : "
        "!ttg.memdesc<64x16xf16, #shared, #smem> * !ttg.memdesc<16x64xf16, #shared1, #smem> -> "
        "tensor<64x64xf32, #mma> loc(#loc7)",
        "%t = tt.dot %a2, %b2, %c2, inputPrecision = tf32 : tensor<16x256xbf16, #ttg.dot_op<{opIdx = 0, parent = "
        "#mma1, kWidth = 4}>> * tensor<256x32xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 4}>> -> "
        "tensor<16x32xf32, #mma1> loc(#loc9)",
        '#loc1 = loc(unknown)',
        '#loc5 = loc("/k/a.py":20:13)',
        '#loc6 = loc("/k/a.py":30:5)',
        '#loc7 = loc("s"(#loc5))',
        '#loc8 = loc("/k/helper.py":3:9)',
        "#loc9 = loc(callsite(#loc8 at #loc6))",
    ])
    d1, d2 = _asm.ttgir_dots(ttgir)
    assert (d1.site, d1.M, d1.N, d1.K, d1.version, d1.repeat()) == ("a.py:20:13", 64, 64, 16, 3, 2)
    assert (d2.site, d2.M, d2.N, d2.K, d2.version, d2.repeat()) == ("helper.py:3:9", 16, 32, 256, 2, 2)
    ptx = "\n".join(['\t.loc\t1 20 13', "\twgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%r1}, %rd1, %rd2, 0, 1, 1, 0, 1;",
                     "\twgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%r2}, %rd1, %rd3, 0, 1, 1, 0, 1;",
                     '\t.loc\t2 3 9, function_name $L__info_string0, inlined_at 1 30 5'] +
                    ["\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};"] * 16 +
                    ['\t.file\t1 "/k/a.py"', '\t.file\t2 "/k/helper.py"'])
    ev = _asm.mma_evidence([d1, d2], _asm.ptx_mmas(ptx), num_warps=8)
    assert ev["family"] == "wgmma+mma.sync" and ev["consistent"], ev
    assert [(s["site"], s["count"], s["min_count"], s["ratio"]) for s in ev["sites"]] == \
        [("a.py:20:13", 2, 1.0, 2.0), ("helper.py:3:9", 16, 8.0, 2.0)]
    # one instruction more than the layout implies (e.g. an unrolled copy): inconsistent
    ev = _asm.mma_evidence([d1, d2], _asm.ptx_mmas(ptx.replace("\t.file", "\tmma.sync.aligned.m16n8k16.row.col"
                                                                         ".f32.bf16.bf16.f32 {%f1};\n\t.file", 1)), 8)
    assert not ev["consistent"]


# ----------------------------------------------------------------------------------------------
# the committed table
# ----------------------------------------------------------------------------------------------
def _table_fields(r: dict) -> dict:
    """What a fresh compile with the same Triton reproduces exactly."""
    return {"regs": r["regs"], "spill_bytes": r["spill_bytes"], "shared_bytes": r["shared_bytes"],
            "blocks_per_sm": r["blocks_per_sm"], "mma_family": r["mma"]["family"], "mma_count": r["mma"]["count"],
            "atomics": r["atomics"]["total"], "ordered_atomics": r["atomics"]["ordered"]}


def committed_table_path() -> str:
    return os.path.join(RESULTS, f"aot_evidence_triton-{triton.__version__}.json")


def test_committed_table_is_current(registry_results):
    path = committed_table_path()
    if not os.path.exists(path):
        pytest.skip(f"no committed table for triton {triton.__version__} ({os.path.relpath(path, ROOT)})")
    with open(path) as f:
        table = json.load(f)
    assert table["header"]["triton"] == triton.__version__, path
    committed = {(r["name"], r["cap"]): r for r in table["results"]}
    fresh = _ok(registry_results)
    regen = ("regenerate: TRITON_DEFAULT_FP_FUSION=1 python -m attnfast.kernels.aot --launches benchmarks/aot_launches.py"
             f" --json benchmarks/results/aot_evidence_triton-{triton.__version__}.json"
             f" --markdown benchmarks/results/aot_evidence_triton-{triton.__version__}.md")
    assert set(committed) == set(registry_results), (
        f"{os.path.relpath(path, ROOT)} is stale: configs added {sorted(set(registry_results) - set(committed))[:5]}, "
        f"removed {sorted(set(committed) - set(registry_results))[:5]}; {regen}")
    diff = [f"{name} sm_{cap}: committed {_table_fields(committed[(name, cap)])} != fresh {_table_fields(r)}"
            for (name, cap), r in sorted(fresh.items())
            if "error" in committed[(name, cap)] or _table_fields(committed[(name, cap)]) != _table_fields(r)]
    assert not diff, f"{os.path.relpath(path, ROOT)} is stale ({len(diff)} rows); {regen}:\n" + "\n".join(diff[:20])


def test_markdown_table_names_versions_and_every_row(aot_report):
    md = aot_report["markdown"]
    head = aot_report["header"]
    assert f"triton {head['triton']}" in md and head["date"] in md
    assert all(v in md for v in head["ptxas"].values()), head["ptxas"]
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == len(aot_report["results"]), (len(rows), len(aot_report["results"]))
