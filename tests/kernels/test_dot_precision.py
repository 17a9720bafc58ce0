"""The one fp32 dot policy (``kernels._launch.dot_precision``): TF32 exactly when the eager op the kernel
replaces would (``like="conv"``: cuDNN's setting; ``like="matmul"``: the matmul setting), IEEE for 16-bit and
off CUDA; self-attention, whose fp32 tiles are FMA tiles, IEEE only."""
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


def test_self_attention_has_ieee_fp32_builds_only(monkeypatch):
    """Its fp32 tiles are FMA tiles: IEEE whatever torch allows, and only IEEE builds registered."""
    monkeypatch.setattr(L, "DOT_KINDS", {**L.DOT_KINDS, "matmul": lambda: True, "conv": lambda: True})
    assert S._prec(torch.empty(0, device="meta").new_empty(0)) == "ieee"
    assert L.dot_precision(torch.float32, CUDA, like=S.DOT_KIND) == "ieee"
    assert {c.constexprs["PREC"] for c in S.aot_configs() if "PREC" in c.constexprs} == {"ieee"}
