"""float64 is computed in float64 (gradcheck), and autocast does not leak into the ops' own math."""
import pytest
import torch

from attnfast.ops import grid_attention, residual_gate, self_attention
from attnfast.ops.grid_attention import grid_attention_op
from attnfast.ops.self_attention import self_attention_op


def _grid_inputs(dtype=torch.float64):
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    return (mk(2, 3, 4, 6), mk(2, 5, 2, 3), mk(4, 3, 1, 1), mk(4, 5, 1, 1), mk(1, 4, 1, 1), mk(1))


@pytest.mark.parametrize("normalize", [True, False])
def test_grid_attention_gradcheck_fp64(torch_backend, normalize):
    inputs = _grid_inputs()
    assert torch.autograd.gradcheck(lambda *t: grid_attention(*t, 2, normalize), inputs)


def test_residual_gate_gradcheck_fp64(torch_backend):
    m = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(residual_gate, (m, t))


def test_self_attention_gradcheck_fp64(torch_backend):
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v, x, gamma = mk(2, 2, 7), mk(2, 2, 7), mk(2, 3, 7), mk(2, 3, 7), mk(1)
    assert torch.autograd.gradcheck(self_attention, (q, k, v, x, gamma))


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_autocast_does_not_change_the_ops(request, backend, device):
    request.getfixturevalue(backend)
    l, g, wl, wg, pw, pb = (t.detach().float().to(device) for t in _grid_inputs())
    plain = grid_attention_op(l, g, wl, wg, pw, pb, 2, True)
    with torch.autocast(device, dtype=torch.bfloat16):
        auto = grid_attention_op(l, g, wl, wg, pw, pb, 2, True)
    for a, b in zip(plain, auto):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    q, k, v = (torch.randn(2, d, 9, device=device) for d in (16, 16, 8))
    plain = self_attention_op(q, k, v, None, None, 1.0, True)
    with torch.autocast(device, dtype=torch.bfloat16):
        auto = self_attention_op(q, k, v, None, None, 1.0, True)
    for a, b in zip(plain, auto):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_self_attention_rejects_zero_keys():
    with pytest.raises(ValueError, match="at least one key"):
        self_attention(torch.randn(1, 2, 4), torch.randn(1, 2, 0), torch.randn(1, 3, 0))
