"""Grid attention's backward under ``torch.use_deterministic_algorithms(True)``: the atomics-free
build is launched (dz stored, then reduced in a fixed order by ``upsample_adjoint``), and two runs
give bitwise equal gradients. Its binary's PTX has no atomics: ``test_ptx_evidence.py``.

On CPU the interpreter runs the atomics in program order, so bitwise equality alone would hold for
the atomic build too; what fails on a build without a deterministic path is the recorded launch."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from attnfast.kernels import grid_attention as G
from attnfast.ops.grid_attention import grid_attention


class _Spy:
    """Wraps the backward kernel: records each launch's keyword arguments, then launches it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def _deterministic(on: bool):
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def _inputs(seed=0, B=2, C=20, H=6, Cg=8, A=24, up=2):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, C, H, H), (B, Cg, H // up, H // up), (A, C, 1, 1), (A, Cg, 1, 1), (1, A, 1, 1), (1,)]
    return [torch.randn(s, generator=gen) for s in shapes], up


def _grads(deterministic: bool):
    (l, g, wl, wg, pw, pb), up = _inputs()
    leaves = [t.requires_grad_() for t in (l, g, wl, wg, pw, pb)]
    with _deterministic(deterministic):
        a, pooled = grid_attention(*leaves, up, True)
        torch.autograd.backward([a, pooled], [torch.linspace(-1, 1, a.numel()).view(a.shape),
                                              torch.linspace(1, -2, pooled.numel()).view(pooled.shape)])
    return [t.grad.clone() for t in leaves]


@pytest.fixture
def launches(monkeypatch, triton_backend):
    log = []
    monkeypatch.setattr(G, "grid_bwd_kernel", _Spy(G.grid_bwd_kernel, log))
    return log


def test_deterministic_mode_takes_the_atomics_free_path_and_repeats_bitwise(launches):
    first = _grads(True)
    assert launches and all(kw["DZ_OUT"] is True for kw in launches), launches
    second = _grads(True)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_default_mode_keeps_the_atomic_path_and_both_agree(launches):
    atomic = _grads(False)
    assert launches and all(kw["DZ_OUT"] is False for kw in launches), launches
    det = _grads(True)
    for name, x, y in zip(("dl", "dg", "dW_l", "dW_g", "dphi_w", "dphi_b"), atomic, det):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("up,H,W", [(2, 6, 10), (4, 8, 12), (1, 5, 3), (3, 9, 6)])
def test_upsample_adjoint_is_the_adjoint_of_bilinear_upsampling(up, H, W):
    """``upsample_adjoint`` is the gradient of ``F.interpolate(bilinear, align_corners=False)``."""
    h, w, B, A = H // up, W // up, 2, 5
    gen = torch.Generator().manual_seed(1)
    gp = torch.randn(B, A, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(B, A, H, W, generator=gen, dtype=torch.float64)
    F.interpolate(gp, size=(H, W), mode="bilinear", align_corners=False).backward(dz)
    got = G.upsample_adjoint(dz.permute(0, 2, 3, 1).float().contiguous(), h, w, up)
    torch.testing.assert_close(got.double(), gp.grad.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
