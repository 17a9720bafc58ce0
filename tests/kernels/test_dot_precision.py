"""The one fp32 dot policy (``kernels._launch.dot_precision``): TF32 exactly when the eager op the kernel
replaces would (``like="conv"``: cuDNN's setting; ``like="matmul"``: the matmul setting), IEEE for 16-bit and
off CUDA; and the self-attention launchers register every precision they can pick."""
import pytest
import torch

from attnfast.kernels import _launch as L
from attnfast.kernels import self_attention as S

CUDA = torch.device("cuda")


@pytest.mark.parametrize("conv, matmul", [(True, False), (False, True), (True, True), (False, False)])
def test_each_kind_follows_its_own_eager_setting(monkeypatch, conv, matmul):
    monkeypatch.setattr(L, "DOT_KINDS", {"conv": lambda: conv, "matmul": lambda: matmul})
    assert L.dot_precision(torch.float32, CUDA, like="conv") == ("tf32" if conv else "ieee")
    assert L.dot_precision(torch.float32, CUDA, like="matmul") == ("tf32" if matmul else "ieee")
    for dtype in (torch.float16, torch.bfloat16):
        assert L.dot_precision(dtype, CUDA, like="matmul") == "ieee"
    assert L.dot_precision(torch.float32, "cpu", like="conv") == "ieee"
    with pytest.raises(ValueError, match="like must be one of"):
        L.dot_precision(torch.float32, CUDA, like="attention")


def test_matmul_setting_is_read_from_torch(monkeypatch):
    """Under torch's own flags (the legacy one where the fp32_precision API is absent)."""
    get = getattr(torch._C, "_get_fp32_precision_getter", None)
    keys = [("generic", "all"), ("cuda", "all"), ("cuda", "matmul")]
    saved = [(k, get(*k)) for k in keys] if get is not None else []
    legacy = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert L.matmul_tf32_allowed() is True
        torch.backends.cuda.matmul.allow_tf32 = False
        assert L.matmul_tf32_allowed() is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = legacy
        for k, v in saved:  # parents first: setting a parent may reset its children
            torch._C._set_fp32_precision_setter(*k, v)


def test_self_attention_registers_every_precision_it_picks():
    names = {c.name for c in S.aot_configs()}
    for prec in L.dot_precisions(torch.float32):
        tag = "fp32" if prec == "ieee" else f"fp32,{prec}"
        for d, dv in [(16, 128), (16, 256), (32, 32), (128, 300)]:
            bd, bdv, one_dv = S.blocks(d, dv)
            t = S.tiles("fp32", bd, bdv, one_dv, prec)
            name = f"self_attention.bwd_dq[{tag},D={bd},DV={bdv},one_dv={int(one_dv)}]"
            cfg = next(c for c in S.aot_configs() if c.name == name)
            assert cfg.constexprs["PREC"] == prec and cfg.constexprs["BLOCK_C"] == t["dq"].BLOCK_C
            assert f"self_attention.fwd[{tag},D={bd},DV={bdv}]" in names
