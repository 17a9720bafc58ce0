"""attnfast::residual_gate against the float64 reference: Triton and PyTorch paths, on the test device.

The tests take the ``device`` fixture: Triton interpreted on a CPU, compiled on CUDA on a GPU machine
(bf16 there only). RAN-56's real shapes are in tests/gpu/test_real_shapes.py.
"""
import pytest
import torch

from attnfast.ops import residual_gate
from attnfast.reference import residual_gate_reference
from op_checks import check_gate, dtype_params

SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 14, 14), (2, 4, 9, 2), (5, 33), (4, 8, 28, 28)]


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(request, backend, dtype, shape, device):
    request.getfixturevalue(backend)
    check_gate(shape, dtype, device=device)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16))
def test_channels_last_matches_reference(request, backend, dtype, device):
    request.getfixturevalue(backend)
    check_gate((2, 6, 5, 7), dtype, device=device, channels_last=True)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_channels_last_and_stride0_grad(request, backend, device):
    request.getfixturevalue(backend)
    m = torch.randn(2, 6, 5, 7, device=device).to(memory_format=torch.channels_last).requires_grad_()
    t = torch.randn(2, 6, 5, 7, device=device).to(memory_format=torch.channels_last).requires_grad_()
    out = residual_gate(m, t)
    assert out.is_contiguous(memory_format=torch.channels_last), "output should keep channels_last"
    out.sum().backward()  # the incoming gradient is an expanded scalar: all strides 0
    s = torch.sigmoid(m.detach())
    torch.testing.assert_close(m.grad, t.detach() * s * (1 - s))
    torch.testing.assert_close(t.grad, 1 + s)


def test_non_dense_inputs(triton_backend, device):
    m = torch.randn(4, 6, 10, 8, device=device)[:, ::2, :, ::2]  # non-contiguous views
    t = torch.randn(4, 3, 10, 4, device=device).transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(residual_gate(m, t), residual_gate_reference(m, t))


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_opcheck(request, backend, device):
    request.getfixturevalue(backend)
    m = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.attnfast.residual_gate.default, (m, t))


def test_torch_compile_fullgraph(triton_backend, device):
    m = torch.randn(2, 3, 4, 5, device=device)
    t = torch.randn(2, 3, 4, 5, device=device)
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


def test_nan_fill_is_active(device):
    """The harness poisons fresh attnfast buffers, so an unwritten element would be caught."""
    from attnfast import _alloc

    assert torch.isnan(_alloc.empty(4, device=device)).all()


def test_fused_module_matches_reference_module(device):
    from attnfast.nn import ResidualAttentionModule
    from attnfast.reference import ResidualAttentionModule as Ref

    ref = Ref(16, encoder_depth=2).eval().to(device)
    fused = ResidualAttentionModule(16, encoder_depth=2).eval().to(device)
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 14, 14, device=device)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "stride0_grad", "mixed"])
def test_cpu_chunks_are_eagers_bits(torch_backend, monkeypatch, workers, layout):
    """The CPU path in chunks (small ones here: 100 elements asked, 64 used, many tasks, a ragged last one) on 1 or 3 workers
    gives single-threaded eager's bits, forward and backward, nonfinite values included: the same ops on every
    element, chunks aligned for ATen's vector loops. ``mixed``: m channels_last, t contiguous (no chunks; sigmoid
    in m's layout as eager's)."""
    from attnfast import _cpu_pool

    RG = __import__("sys").modules["attnfast.ops.residual_gate"]
    monkeypatch.setattr(RG, "CPU_CHUNK_ELEMS", 100)  # rounded down to 64
    monkeypatch.setattr(_cpu_pool, "workers", lambda: workers)
    gen = torch.Generator().manual_seed(0)
    m0, t0 = torch.randn(2, 6, 5, 7, generator=gen) * 4, torch.randn(2, 6, 5, 7, generator=gen)
    m0.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -200.0])
    t0.view(-1)[3:6] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    if layout in ("channels_last", "mixed"):
        m0 = m0.to(memory_format=torch.channels_last)
    if layout == "channels_last":
        t0 = t0.to(memory_format=torch.channels_last)
    g = torch.ones(()).expand(m0.shape) if layout == "stride0_grad" else torch.randn(m0.shape, generator=gen)
    runs = []
    threads = torch.get_num_threads()
    for fn in (residual_gate, lambda m, t: (1 + torch.sigmoid(m)) * t):
        m, t = m0.clone().requires_grad_(), t0.clone().requires_grad_()
        if len(runs):
            torch.set_num_threads(1)  # eager, single-threaded
        try:
            out = fn(m, t)
            out.backward(g)
        finally:
            torch.set_num_threads(threads)
        runs.append((out.detach(), m.grad, t.grad))
    for got, want in zip(*runs):
        assert torch.equal(got.nan_to_num(7.0, 8.0, 9.0), want.nan_to_num(7.0, 8.0, 9.0))
        assert torch.equal(got.isnan(), want.isnan())
