"""Every attention-gate kernel configuration the launchers can pick is registered for the AOT compile
(``kernels.attention_gate.aot_configs``): the logits kernels for every F_int up to MAX_F, each dtype and fp32
precision (theta's stride is a runtime argument), with and without resizing g; the gating kernels per dtype."""
import torch

from attnfast.kernels import attention_gate as A
from attnfast.kernels._launch import DTYPES, dot_precisions


def test_attention_gate_choices_are_registered():
    names = {c.name for c in A.aot_configs()}
    missing = set()
    for dtype in DTYPES:
        for prec in dot_precisions(dtype, like="conv"):
            for fi in range(1, A.MAX_F + 1):
                cfg = A.blocks(fi, dtype)
                for interp in (False, True):
                    for kind in ("fwd", "bwd", "bwd_weight"):
                        name = A.config_name(kind, dtype, prec, cfg, interp)
                        if name not in names:
                            missing.add(f"{name} (F_int={fi})")
        for kind in ("gate_fwd", "gate_bwd"):
            if f"attention_gate.{kind}[{DTYPES[dtype]}]" not in names:
                missing.add(f"attention_gate.{kind}[{DTYPES[dtype]}]")
    assert not missing, sorted(missing)[:10]
    assert len(names) == len(A.aot_configs()), "configuration names must be unique"


def test_launch_uses_registered_tiles():
    """blocks() is what the launchers use: F_int beyond a bucket never picks an unregistered tile."""
    assert A.blocks(256, torch.float16)["BLOCK_F"] == A.MAX_F
    assert A.blocks(1, torch.float32)["BLOCK_F"] == 32
