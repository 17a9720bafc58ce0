"""The residual gate's two kernel paths: dense (one shared dense layout, 32-bit flat offsets) and
strided (any strides, 64-bit index arithmetic), each against the float64 reference.

Every case asserts which kernels ran (a spy on the launch), so a change in the path selection fails
here rather than silently testing the other path. Takes the ``device`` fixture: interpreted on a CPU,
compiled on CUDA on a GPU machine.
"""
import pytest
import torch

from attnfast.kernels import residual_gate as R
from attnfast.ops import residual_gate
from attnfast.reference import residual_gate_reference
from attnfast.testing import assert_close_3way

DTYPES = [torch.float32, torch.float16]
KERNELS = ("residual_gate_fwd_dense_kernel", "residual_gate_bwd_dense_kernel",
           "residual_gate_fwd_kernel", "residual_gate_bwd_kernel")


class _Spy:
    """Counts launches of a Triton kernel (``kernel[grid](...)``) and forwards them."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.fixture
def launches(triton_backend, monkeypatch):
    spies = {name: _Spy(getattr(R, name)) for name in KERNELS}
    for name, spy in spies.items():
        monkeypatch.setattr(R, name, spy)
    return lambda: {name.replace("residual_gate_", "").replace("_kernel", ""): spy.calls
                    for name, spy in spies.items()}


def _run(fn, m, t, grad):
    m = m.detach().requires_grad_()  # detach keeps the strides (clone would make views dense)
    t = t.detach().requires_grad_()
    out = fn(m, t)
    if grad is None:
        out.sum().backward()  # upstream gradient: an expanded scalar, every stride 0
    else:
        torch.autograd.backward(out, grad)
    return out.detach(), m.grad, t.grad


def _check(m, t, grad, dtype, name, view=lambda x: x):
    """Forward and both gradients vs float64 (three-way rule); returns the fused outputs. ``view`` is
    applied to m and t after the cast to ``dtype`` (a cast makes a strided view dense)."""
    def cast(x, dt=dtype):
        return None if x is None else x.to(dt)

    ref = _run(residual_gate_reference, view(cast(m, torch.float64)), view(cast(t, torch.float64)),
               cast(grad, torch.float64))
    eager = _run(residual_gate_reference, view(cast(m)), view(cast(t)), cast(grad))
    out = _run(residual_gate, view(cast(m)), view(cast(t)), cast(grad))
    assert_close_3way(out, ref, eager, name=name)
    return out


def _inputs(shape, device, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(7)
    m, t, g = (torch.randn(*shape, generator=gen) for _ in range(3))
    m = m * 3  # both tails of the sigmoid
    return [x.to(device=device, memory_format=memory_format) for x in (m, t, g)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (3, 16, 14, 14), (5, 33), (1037,), (2, 1, 5, 7)], ids=str)
def test_dense_contiguous(launches, dtype, shape, device):
    m, t, g = _inputs(shape, device)
    _check(m, t, g, dtype, f"dense {shape} {dtype}")
    assert launches() == {"fwd_dense": 1, "bwd_dense": 1, "fwd": 0, "bwd": 0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 1, 5, 7), (4, 8, 28, 28)], ids=str)
def test_dense_channels_last(launches, dtype, shape, device):
    m, t, g = _inputs(shape, device, torch.channels_last)
    out, dm, dt = _check(m, t, g, dtype, f"channels_last {shape} {dtype}")
    for x in (out, dm, dt):
        assert x.is_contiguous(memory_format=torch.channels_last), "the layout should be kept"
    assert launches() == {"fwd_dense": 1, "bwd_dense": 1, "fwd": 0, "bwd": 0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_stride0_gradient_takes_the_strided_backward(launches, dtype, memory_format, device):
    m, t, _ = _inputs((2, 6, 5, 7), device, memory_format)
    _check(m, t, None, dtype, f"stride-0 grad {memory_format} {dtype}")
    assert launches() == {"fwd_dense": 1, "bwd_dense": 0, "fwd": 0, "bwd": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_layouts_take_the_strided_path(launches, dtype, device):
    m, t, g = _inputs((2, 6, 5, 7), device)
    t = t.to(memory_format=torch.channels_last)  # the output follows t: m's layout differs
    _check(m, t, g, dtype, f"mixed layouts {dtype}")
    counts = launches()
    assert counts["fwd"] == 1 and counts["fwd_dense"] == 0
    assert counts["bwd"] == 1 and counts["bwd_dense"] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_dense_views_take_the_strided_path(launches, dtype, device):
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(4, 6, 10, 8, generator=gen).to(device)
    t = torch.randn(4, 6, 10, 8, generator=gen).to(device)
    g = torch.randn(4, 3, 10, 4, generator=gen).to(device)
    _check(m, t, g, dtype, f"strided views {dtype}", view=lambda x: x[:, ::2, :, ::2])
    counts = launches()
    assert counts["fwd"] == 1 and counts["fwd_dense"] == 0 and counts["bwd"] == 1


def test_numel_bound_sends_large_tensors_to_the_strided_path(launches, monkeypatch, device):
    """Beyond the 32-bit bound the dense kernels are not used (bound lowered to test it on small data)."""
    m, t, g = _inputs((2, 6, 5, 7), device)
    monkeypatch.setattr(R, "MAX_DENSE_NUMEL", m.numel() - 1)
    _check(m, t, g, torch.float32, "numel above the dense bound")
    assert launches() == {"fwd_dense": 0, "bwd_dense": 0, "fwd": 1, "bwd": 1}


def test_dense_bound_keeps_offsets_in_int32():
    assert R.MAX_DENSE_NUMEL + R.BLOCK <= 2 ** 31
    assert R.uses_dense_path(torch.empty(3, 4), torch.empty(3, 4))
    assert not R.uses_dense_path(torch.empty(3, 4), torch.empty(4, 3).t())
    assert not R.uses_dense_path(torch.empty(3, 4)[:, ::2], torch.empty(3, 4)[:, ::2])
    assert not R.uses_dense_path(torch.empty(3, 4), torch.empty(()).expand(3, 4))


def test_both_paths_are_registered_for_aot():
    names = {c.name for c in R.aot_configs()}
    for dt in R.DTYPES.values():
        for kind in ("fwd", "bwd", "fwd_dense", "bwd_dense"):
            assert f"residual_gate.{kind}[{dt},BLOCK={R.BLOCK}]" in names
