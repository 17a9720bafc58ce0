"""Every configuration a launcher can pick at run time is registered for the AOT compile.

The launchers choose tiles with heuristics (no autotune), so this sweeps those heuristics over every
dimension they depend on and checks each choice against ``aot_configs()``."""
import torch

from attnfast.kernels import grid_attention as G
from attnfast.kernels import residual_gate as R
from attnfast.kernels import self_attention as S


def test_self_attention_choices_are_registered():
    names = {c.name for c in S.aot_configs()}
    missing = set()
    for dt in S.DTYPES.values():
        missing.add(f"self_attention.bwd_rowsum[{dt}]") if f"self_attention.bwd_rowsum[{dt}]" not in names else None
        for d in range(1, S.MAX_D + 1):
            for dv in list(range(1, 300)) + [512, 1024]:
                bd, bdv, one_dv = S.blocks(d, dv)
                tag = f"{dt},D={bd},DV={bdv},one_dv={int(one_dv)}"
                for name in (f"self_attention.fwd[{dt},D={bd},DV={bdv}]", f"self_attention.bwd_dkdv[{tag}]",
                             f"self_attention.bwd_dq[{tag}]"):
                    if name not in names:
                        missing.add(f"{name} (d={d}, dv={dv})")
    assert not missing, sorted(missing)[:10]


def test_grid_attention_choices_are_registered():
    names = {c.name for c in G.aot_configs()}
    missing = set()
    for dtype in G.DTYPES:
        for prec in G._precisions(dtype):
            for a in range(1, G.MAX_ATTN_FEATURES + 1):
                for kind, det in (("fwd", False), ("bwd", False), ("bwd", True)):
                    cfg = G.main_blocks(a, dtype, backward=kind == "bwd")
                    name = G._main_config(kind, dtype, prec, cfg, det).name
                    if name not in names:
                        missing.add(f"{name} (A={a})")
            for c in range(1, 2049):
                name = G._weight_config(dtype, prec, G.weight_blocks(c, dtype, prec)).name
                if name not in names:
                    missing.add(f"{name} (C={c})")
    assert not missing, sorted(missing)[:10]


def test_residual_gate_choices_are_registered():
    names = {c.name for c in R.aot_configs()}
    for dt in R.DTYPES.values():
        assert f"residual_gate.fwd[{dt},BLOCK={R.BLOCK}]" in names
        assert f"residual_gate.bwd[{dt},BLOCK={R.BLOCK}]" in names


def test_precision_choice_is_one_of_the_registered():
    for dtype in G.DTYPES:
        assert G.precision_for(dtype) in G._precisions(dtype)


def test_attention_pool_choices_are_registered():
    from attnfast.kernels import attention_pool as P

    names = {c.name for c in P.aot_configs()}
    for dtype, dt in P.DTYPES.items():
        for kind in ("fwd", "bwd"):
            bp, bc, warps = P.tile(kind, dtype)
            assert f"attention_pool.{kind}[{dt},P={bp},C={bc},w={warps}]" in names
        assert f"attention_pool.combine[{dt},S={P.BLOCK_S},C={P.COMBINE_BLOCK_C}]" in names
