"""bfloat16: refused on the Triton interpreter, checked on the PyTorch path, for every op.

The Triton interpreter computes bf16 wrong (a 16x16 bf16 ``tl.dot`` is off by ~1e10 in triton 3.8's), so
with ``TRITON_INTERPRET=1`` every op raises a RuntimeError for bf16 inputs (``attnfast._dispatch``) instead
of returning garbage. The PyTorch path computes bf16 in fp32 and is checked here against float64 with the
three-way rule, on the test device. On a GPU machine the op matrices (tests/ops/test_*.py) run bf16 through
the compiled kernels (their gpu-marked cases).
"""
import pytest
import torch

from attnfast.ops import attention_pool, cbam, grid_attention, residual_gate, self_attention
from op_checks import check_attention_pool, check_cbam, check_gate, check_grid, check_sagan

pytest.importorskip("timm.layers.cbam")  # check_cbam's reference

REFUSED = "bfloat16 cannot run on the Triton interpreter"


def _bf16(*shapes):
    return [torch.randn(s).to(torch.bfloat16) for s in shapes]


CALLS = {
    "grid_attention": lambda: grid_attention(*_bf16((1, 4, 4, 4), (1, 3, 2, 2), (8, 4), (8, 3), (1, 8), (1,)), 2),
    "self_attention": lambda: self_attention(*_bf16((1, 2, 5), (1, 2, 5), (1, 3, 5))),
    "residual_gate": lambda: residual_gate(*_bf16((2, 3, 4, 4), (2, 3, 4, 4))),
    "cbam": lambda: cbam(*_bf16((2, 8, 3, 3), (2, 8, 1, 1), (2,), (8, 2, 1, 1), (8,), (1, 2, 3, 3), (1,), (1,))),
    "attention_pool": lambda: attention_pool(*_bf16((2, 3, 4, 5), (1, 3, 1, 1), (1,), (2, 3, 1, 1))),
}


@pytest.mark.parametrize("op", list(CALLS))
def test_interpreter_refuses_bf16(triton_backend, op):
    """CPU tensors with the forced Triton backend run on the interpreter: bf16 is a clear error there."""
    with pytest.raises(RuntimeError, match=REFUSED) as err:
        CALLS[op]()
    assert "ATTNFAST_BACKEND=torch" in str(err.value) and "GPU" in str(err.value)


@pytest.mark.parametrize("op", list(CALLS))
def test_bf16_runs_on_the_pytorch_path(torch_backend, op):
    out = CALLS[op]()
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# the PyTorch path in bf16 against float64 (forward and every gradient), on the test device
def test_grid_attention_bf16(torch_backend, device):
    check_grid(2, 16, 16, 16, 12, 10, 2, True, torch.bfloat16, device=device)
    check_grid(1, 8, 4, 16, 9, 6, 3, False, torch.bfloat16, device=device)


def test_self_attention_bf16(torch_backend, device):
    check_sagan((2, 16, 9, 11), torch.bfloat16, device=device)


def test_residual_gate_bf16(torch_backend, device):
    check_gate((2, 3, 5, 7), torch.bfloat16, device=device)
    check_gate((2, 6, 5, 7), torch.bfloat16, device=device, channels_last=True)


@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
def test_cbam_bf16(torch_backend, light, device):
    check_cbam((2, 20, 9, 9), torch.bfloat16, light, True, device)


def test_attention_pool_bf16(torch_backend, device):
    check_attention_pool(2, 20, 7, 9, torch.bfloat16, device=device)
    check_attention_pool(2, 8, 5, 6, torch.bfloat16, g_kind="map", normalize="sigmoid", reduce="mean", bias=True,
                         device=device, channels_last=True)
