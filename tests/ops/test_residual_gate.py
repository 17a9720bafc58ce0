"""attnfast::residual_gate against the float64 reference: Triton (interpreted on CPU) and PyTorch paths."""
import pytest
import torch

from attnfast.ops import residual_gate
from attnfast.reference import residual_gate_reference
from attnfast.testing import assert_close_3way

SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 14, 14), (2, 4, 9, 2), (5, 33), (4, 8, 28, 28)]


def _run(fn, m, t, grad):
    m = m.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = fn(m, t)
    out.backward(grad)
    return out.detach(), m.grad, t.grad


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(request, backend, dtype, shape):
    request.getfixturevalue(backend)
    m = torch.randn(shape, dtype=torch.float64) * 3
    t = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    ref = _run(residual_gate_reference, m, t, g)
    eager = _run(residual_gate_reference, m.to(dtype), t.to(dtype), g.to(dtype))
    out = _run(residual_gate, m.to(dtype), t.to(dtype), g.to(dtype))
    for o in out:
        assert o.dtype == dtype
    assert_close_3way(out, ref, eager, name=f"residual_gate{shape}")


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_channels_last_and_stride0_grad(request, backend):
    request.getfixturevalue(backend)
    m = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last).requires_grad_()
    t = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last).requires_grad_()
    out = residual_gate(m, t)
    assert out.is_contiguous(memory_format=torch.channels_last), "output should keep channels_last"
    out.sum().backward()  # the incoming gradient is an expanded scalar: all strides 0
    s = torch.sigmoid(m.detach())
    torch.testing.assert_close(m.grad, t.detach() * s * (1 - s))
    torch.testing.assert_close(t.grad, 1 + s)


def test_non_dense_inputs(triton_backend):
    m = torch.randn(4, 6, 10, 8)[:, ::2, :, ::2]  # non-contiguous views
    t = torch.randn(4, 3, 10, 4).transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(residual_gate(m, t), residual_gate_reference(m, t))


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_opcheck(request, backend):
    request.getfixturevalue(backend)
    m = torch.randn(2, 3, 4, 5, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.attnfast.residual_gate.default, (m, t))


def test_torch_compile_fullgraph(triton_backend):
    m = torch.randn(2, 3, 4, 5)
    t = torch.randn(2, 3, 4, 5)
    f = torch.compile(lambda a, b: residual_gate(a, b) * 2 + 1, fullgraph=True)
    torch.testing.assert_close(f(m, t), residual_gate_reference(m, t) * 2 + 1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        residual_gate(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="dtype"):
        residual_gate(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating"):
        residual_gate(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at most 4"):
        residual_gate(torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 5))


def test_nan_fill_is_active():
    """The harness poisons fresh attnfast buffers, so an unwritten element would be caught."""
    from attnfast import _alloc

    assert torch.isnan(_alloc.empty(4)).all()


def test_fused_module_matches_reference_module():
    from attnfast.nn import ResidualAttentionModule
    from attnfast.reference import ResidualAttentionModule as Ref

    ref = Ref(16, encoder_depth=2).eval()
    fused = ResidualAttentionModule(16, encoder_depth=2).eval()
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 14, 14)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_kernels_match_reference(device, dtype):
    """Compiled kernels on CUDA (bf16 is only testable here: the interpreter's bf16 is wrong)."""
    shape = (4, 64, 28, 28)
    m = torch.randn(shape, dtype=torch.float64) * 3
    t = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    ref = _run(residual_gate_reference, m, t, g)
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    eager = [x.cpu() for x in _run(residual_gate_reference, to(m), to(t), to(g))]
    out = [x.cpu() for x in _run(residual_gate, to(m), to(t), to(g))]
    assert_close_3way(out, ref, eager, name=f"residual_gate[{dtype}]")
