"""Spill budgets of the registered kernel configurations, and the measurements they come from.

A spill is what ptxas reports as ``bytes spill stores`` + ``bytes spill loads`` for one compiled
binary (``registry.compile_config``). ``SPILLS`` lists every configuration that spilled on sm_80 or
sm_90 under a measured triton, with the largest spill over its binaries (its plain build and every
binary a captured benchmark launch runs, see ``launches``), per triton and target, as measured by
``python -m attnfast.kernels.aot --launches benchmarks/aot_launches.py`` with that triton (the
committed tables: ``benchmarks/results/aot_evidence_triton-<version>.json``).

The rule:

- a configuration's budget on sm_X is the largest spill listed for it on sm_X under any measured
  triton (the envelope: each triton ships its own LLVM and ptxas, and none is uniformly better);
- a configuration not listed has budget 0 on both targets: it spilled nothing under any measured
  triton;
- a triton not in ``MEASURED_TRITONS`` is held to the same budgets. When one of its compiles goes
  over budget, the AOT run fails and says how to re-measure: retune the tile first (the
  configuration's kernel module); a spill that no tile avoids is recorded here under that triton's
  version, which raises the envelope for every triton, and the triton joins ``MEASURED_TRITONS``.

Targets other than sm_80 and sm_90 take the larger of the two.
"""
from __future__ import annotations

MEASURED_TRITONS = ("3.6.0", "3.7.1", "3.8.0", "3.9.0")
CAPS = (80, 90)

# configuration -> triton version -> (sm_80 bytes, sm_90 bytes), the largest over its binaries; every
# measured triton is listed. Derived from the four committed tables
# (benchmarks/results/aot_evidence_triton-<v>.json, regenerated 2026-12-03 after the NaN/inf-exact kernels and
# the attention pooling and gate ops landed). Grid and CBAM entries are mostly launch binaries' spills (ptxas
# trading a few bytes for occupancy, see benchmarks/results/kernel_tuning.md) and the fp32 deterministic
# backward; self-attention entries are D >= 64, fp32, and (triton 3.9.0 only) the 16-bit dK/dV kernels at
# D <= 32, which spill 8 B on sm_90 since the NaN-exact gamma scaling. Entries first recorded on 2026-12-03
# were measured, not retuned: their tiles are to be retuned on a GPU pass.
SPILLS = {
    "attention_gate.bwd_weight[bf16,F=32,P=16,w=4]":
        {"3.6.0": (12, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 12)},
    "attention_gate.bwd_weight[fp16,F=32,P=16,w=4]":
        {"3.6.0": (12, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 12)},
    "attention_gate.fwd[fp32,ieee,F=128,interp,P=16,w=8]":
        {"3.6.0": (0, 0), "3.7.1": (0, 12), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "cbam.cbam_bwd_spatial_kernel[fp32,BLOCK_C=32]":
        {"3.6.0": (0, 0), "3.7.1": (0, 12), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "grid_attention.bwd[bf16,P=16,C=64,A=64x4,w=8]":
        {"3.6.0": (16, 24), "3.7.1": (16, 8), "3.8.0": (0, 24), "3.9.0": (0, 0)},
    "grid_attention.bwd[bf16,P=32,C=32,A=16x1,w=4,det]":
        {"3.6.0": (0, 16), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "grid_attention.bwd[fp16,P=32,C=32,A=16x1,w=4,det]":
        {"3.6.0": (0, 16), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "grid_attention.bwd[fp32,ieee,P=32,C=32,A=32x16,w=8,s=1,det]":
        {"3.6.0": (0, 0), "3.7.1": (0, 32), "3.8.0": (0, 24), "3.9.0": (0, 0)},
    "grid_attention.bwd[fp32,ieee,P=32,C=32,A=32x2,w=8,s=1,det]":
        {"3.6.0": (0, 0), "3.7.1": (0, 32), "3.8.0": (0, 16), "3.9.0": (0, 0)},
    "grid_attention.bwd[fp32,ieee,P=32,C=32,A=32x4,w=8,s=1,det]":
        {"3.6.0": (0, 0), "3.7.1": (0, 32), "3.8.0": (0, 24), "3.9.0": (0, 0)},
    "grid_attention.bwd[fp32,ieee,P=32,C=32,A=32x8,w=8,s=1,det]":
        {"3.6.0": (0, 0), "3.7.1": (0, 32), "3.8.0": (0, 24), "3.9.0": (0, 0)},
    "grid_attention.bwd[fp32,tf32,P=32,C=32,A=32x8,w=8,s=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 96), "3.9.0": (0, 0)},
    "grid_attention.bwd_weight[bf16,P=16,C=32,A2=32,C2=32,w=4]":
        {"3.6.0": (0, 40), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "grid_attention.bwd_weight[fp16,P=16,C=32,A2=32,C2=32,w=4]":
        {"3.6.0": (0, 40), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "self_attention.bwd_dkdv[bf16,D=128,DV=128,one_dv=0]":
        {"3.6.0": (12, 0), "3.7.1": (36, 0), "3.8.0": (36, 0), "3.9.0": (36, 276)},
    "self_attention.bwd_dkdv[bf16,D=16,DV=128,one_dv=0]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 8)},
    "self_attention.bwd_dkdv[bf16,D=32,DV=128,one_dv=0]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 8)},
    "self_attention.bwd_dkdv[bf16,D=32,DV=128,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 8)},
    "self_attention.bwd_dkdv[bf16,D=64,DV=128,one_dv=0]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 208)},
    "self_attention.bwd_dkdv[bf16,D=64,DV=128,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 336)},
    "self_attention.bwd_dkdv[fp16,D=128,DV=128,one_dv=0]":
        {"3.6.0": (12, 0), "3.7.1": (36, 0), "3.8.0": (36, 0), "3.9.0": (36, 276)},
    "self_attention.bwd_dkdv[fp16,D=16,DV=128,one_dv=0]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 8)},
    "self_attention.bwd_dkdv[fp16,D=32,DV=128,one_dv=0]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 8)},
    "self_attention.bwd_dkdv[fp16,D=32,DV=128,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 8)},
    "self_attention.bwd_dkdv[fp16,D=64,DV=128,one_dv=0]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 208)},
    "self_attention.bwd_dkdv[fp16,D=64,DV=128,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 336)},
    "self_attention.bwd_dkdv[fp32,D=16,DV=128,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (32, 0), "3.8.0": (32, 0), "3.9.0": (32, 0)},
    "self_attention.bwd_dkdv[fp32,D=16,DV=32,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 0), "3.8.0": (0, 8), "3.9.0": (0, 0)},
    "self_attention.bwd_dkdv[fp32,D=32,DV=128,one_dv=1]":
        {"3.6.0": (0, 56), "3.7.1": (0, 0), "3.8.0": (48, 0), "3.9.0": (48, 0)},
    "self_attention.bwd_dkdv[fp32,D=32,DV=32,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (12, 0), "3.8.0": (0, 0), "3.9.0": (0, 88)},
    "self_attention.bwd_dq[bf16,D=64,DV=128,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 8), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "self_attention.bwd_dq[fp16,D=64,DV=128,one_dv=1]":
        {"3.6.0": (0, 0), "3.7.1": (0, 8), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "self_attention.bwd_dq[fp32,D=128,DV=128,one_dv=0]":
        {"3.6.0": (8, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "self_attention.bwd_dq[fp32,D=16,DV=128,one_dv=0]":
        {"3.6.0": (0, 0), "3.7.1": (0, 32), "3.8.0": (0, 32), "3.9.0": (0, 0)},
    "self_attention.bwd_dq[fp32,D=32,DV=128,one_dv=0]":
        {"3.6.0": (16, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "self_attention.fwd[bf16,D=128,DV=128]":
        {"3.6.0": (96, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 32)},
    "self_attention.fwd[bf16,D=64,DV=128]":
        {"3.6.0": (64, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "self_attention.fwd[fp16,D=128,DV=128]":
        {"3.6.0": (96, 0), "3.7.1": (0, 0), "3.8.0": (0, 32), "3.9.0": (0, 32)},
    "self_attention.fwd[fp16,D=64,DV=128]":
        {"3.6.0": (64, 0), "3.7.1": (0, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
    "self_attention.fwd[fp32,D=16,DV=128]":
        {"3.6.0": (0, 0), "3.7.1": (12, 0), "3.8.0": (0, 0), "3.9.0": (0, 0)},
}


def spill_budget(name: str, cap: int) -> int:
    """Spill budget in bytes of configuration ``name`` on sm_``cap`` (see the module docstring)."""
    rows = SPILLS.get(name)
    if not rows:
        return 0
    cols = [CAPS.index(cap)] if cap in CAPS else range(len(CAPS))
    return max(row[i] for row in rows.values() for i in cols)


def over_budget_advice(name: str, cap: int) -> str:
    """What to do when a compile of ``name`` spills beyond its budget (part of the failure message)."""
    import triton

    seen = "a measured" if triton.__version__ in MEASURED_TRITONS else "an unmeasured"
    return (f"Budgets are the envelope of tritons {', '.join(MEASURED_TRITONS)} (this is {seen} triton, "
            f"{triton.__version__}). Re-measure with `python -m attnfast.kernels.aot --filter '{name}' "
            f"--launches benchmarks/aot_launches.py --caps {cap}`; retune the tile in its kernel module, or, "
            f"if no tile avoids the spill, record the figure in SPILLS['{name}']['{triton.__version__}'] "
            f"(attnfast/kernels/aot/budgets.py, installed from kernels/aot/budgets.py) and add the version "
            f"to MEASURED_TRITONS.")
