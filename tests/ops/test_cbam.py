"""attnfast::cbam against float64 timm modules: Triton (interpreted on CPU) and PyTorch paths.

Each check runs timm's ``CbamModule`` / ``LightCbamModule`` in float64 (the truth), the same module in
the dtype under test (eager), and attnfast's fused module with the same weights, forward and backward
with the same upstream gradient, and compares the output, dx and every parameter gradient with the
three-way rule (attnfast.testing). Shapes are tiny (the interpreter runs each program in Python) but
cover: channel blocks with a masked tail, several channel blocks, several pixel splits, H or W = 1,
channels_last, odd sizes.
"""
import pytest
import torch

import attnfast.config

from attnfast.nn.cbam import CBAM, LightCBAM
from attnfast.ops import cbam as cbam_fn
from attnfast.testing import assert_close_3way
from op_checks import check_cbam, fused_like, make_timm, run  # noqa: F401  (shared with tests/gpu)

timm_cbam = pytest.importorskip("timm.layers.cbam")

# (B, C, H, W): C=20 -> one 32-channel block with a masked tail, 81 px = 2 pixel tiles (split);
# C=40 -> two channel blocks; C=5 with W=1; C=8, 17x17 -> 16-channel tile, 3 tiles of 128 px.
SHAPES = [(2, 20, 9, 9), (1, 40, 5, 3), (3, 5, 7, 1), (2, 8, 17, 17)]


def dtype_params(*dtypes):
    return [pytest.param(d, id=str(d), marks=[pytest.mark.gpu] if d == torch.bfloat16 else []) for d in dtypes]


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_timm(request, backend, dtype, light, shape, device):
    request.getfixturevalue(backend)
    train = shape[0] > 1 and shape != (2, 8, 17, 17)  # eval mode (running statistics) on two shapes
    check_cbam(shape, dtype, light, train, device, channels_last=shape == (1, 40, 5, 3))


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_bias_and_small_kernel(request, backend, device):
    request.getfixturevalue(backend)
    check_cbam((2, 12, 6, 5), torch.float32, False, True, device, mlp_bias=True, kernel=3, rd_ratio=0.5)
    check_cbam((2, 12, 6, 5), torch.float32, True, False, device, mlp_bias=True, kernel=1, rd_ratio=0.5)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
def test_ties_split_like_eager(request, backend, light, device):
    """Integer-valued x with zero MLP output (s_c = 1/2 everywhere): every channel max and every pixel
    max is tied many times over. The gradient is split evenly among the tied elements, as eager
    ``amax`` does, so fp32 results equal eager fp32 and the float64 reference almost bit for bit."""
    request.getfixturevalue(backend)
    C = 12
    ref = make_timm(C, light).to(device)
    with torch.no_grad():
        ref.channel.fc2.weight.zero_()
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (2, C, 5, 6), generator=gen).double().to(device)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
    eager = make_timm(C, light).to(device=device, dtype=torch.float32)
    eager.load_state_dict(ref.state_dict())
    fused = fused_like(ref, light, torch.float32, device)
    out_ref = run(ref, x, g, True)
    out_eager = run(eager, x.float(), g.float(), True)
    out = run(fused, x.float(), g.float(), True)
    for name, o, e, r in zip(["y", "dx", "fc1", "fc2", "conv", "bn.w", "bn.b"], out, out_eager, out_ref):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_stride0_grad_and_non_dense_input(request, backend, device):
    request.getfixturevalue(backend)
    ref = make_timm(16, False).to(device=device, dtype=torch.float32)
    fused = fused_like(ref, False, torch.float32, device)
    base = torch.randn(2, 16, 6, 10, device=device)
    x = base[:, :, :, ::2]  # W stride 2: H and W do not flatten, the op copies
    for xx in (x, base):
        a = xx.detach().clone().requires_grad_()
        b = xx.detach().clone().requires_grad_()
        ref(a).sum().backward()  # the upstream gradient is an expanded scalar: all strides 0
        fused(b).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def _weights(C=8, R=2, light=False, device="cpu", grad=True):
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(R, C, 1, 1, generator=gen), None, torch.randn(C, R, 1, 1, generator=gen), None,
         torch.randn(1, 1 if light else 2, 3, 3, generator=gen), torch.ones(1) * 1.1, torch.zeros(1) + 0.1]
    return [t.to(device).requires_grad_(grad) if t is not None else None for t in w]


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_opcheck(request, backend, train, device):
    request.getfixturevalue(backend)
    x = torch.randn(2, 8, 5, 4, device=device, requires_grad=True)
    w = _weights(device=device)
    stats = [torch.zeros(1, device=device) + 0.2, torch.ones(1, device=device) * 0.9]
    torch.library.opcheck(torch.ops.attnfast.cbam.default, (x, *w, *stats, 1e-5, train, False))
    w = _weights(light=True, device=device)
    torch.library.opcheck(torch.ops.attnfast.cbam.default, (x, *w, None, None, 1e-5, True, True))


def test_torch_compile_fullgraph(triton_backend, device):
    ref = make_timm(8, False).to(device=device, dtype=torch.float32)
    fused = fused_like(ref, False, torch.float32, device)
    ref_c = make_timm(8, False).to(device=device, dtype=torch.float32)
    ref_c.load_state_dict(ref.state_dict())
    step = torch.compile(lambda m, x: (m(x) * 2).sum(), fullgraph=True)
    x = torch.randn(2, 8, 5, 6, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    step(fused, xb).backward()
    (ref_c(xa) * 2).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.spatial.conv.bn.running_var, ref_c.spatial.conv.bn.running_var)
    assert int(fused.spatial.conv.bn.num_batches_tracked) == 1


def test_saves_only_x_and_small_tensors(torch_backend):
    """What autograd keeps: x and the weights, plus tensors of at most 4*(C + H*W) elements per sample."""
    B, C, H, W = 2, 32, 12, 12
    fused = CBAM(C)
    x = torch.randn(B, C, H, W, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused(x)
    params = {p.data_ptr() for p in fused.parameters()}
    big = [tuple(t.shape) for t in saved if t.data_ptr() != x.data_ptr() and t.data_ptr() not in params
           and t.numel() > 4 * B * (C + H * W)]
    assert not big, f"full-size tensors saved for backward: {big}"
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    y.sum().backward()


def test_backend_setting_is_respected(monkeypatch):
    from attnfast.kernels import cbam as K

    calls = []

    def kernel_called(*args):
        calls.append(1)
        raise RuntimeError("kernel called")

    monkeypatch.setattr(K, "channel_pool", kernel_called)
    monkeypatch.setattr(attnfast.config, "BACKEND", "torch")
    m = CBAM(8)
    m(torch.randn(2, 8, 4, 4))
    assert not calls
    monkeypatch.setattr(attnfast.config, "BACKEND", "triton")
    from attnfast._dispatch import interpreter_enabled

    if interpreter_enabled():
        with pytest.raises(RuntimeError, match="kernel called"):
            m(torch.randn(2, 8, 4, 4))
        assert calls


def test_float64_takes_the_torch_path(triton_backend, device):
    ref = make_timm(8, True).float().double().to(device)  # fused_like loads through fp32 parameters
    fused = fused_like(ref, True, torch.float64, device)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    m = CBAM(8)
    with pytest.raises(ValueError, match="8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(2, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value"):
        m.train()(torch.randn(1, 8, 1, 1))
    w = _weights(grad=False)
    x = torch.randn(2, 8, 5, 5)
    with pytest.raises(ValueError, match="odd"):
        cbam_fn(x, *w[:4], torch.randn(1, 2, 4, 4), *w[5:])
    with pytest.raises(ValueError, match=r"\(1, 1, k, k\)"):
        cbam_fn(x, *w, light=True)
    with pytest.raises(ValueError, match="fc2.weight"):
        cbam_fn(x, w[0], None, torch.randn(8, 3, 1, 1), None, *w[4:])
    with pytest.raises(ValueError, match="together"):
        cbam_fn(x, *w, torch.zeros(1), None)
    with pytest.raises(ValueError, match="at least one"):
        cbam_fn(torch.randn(2, 8, 0, 5), *w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
@pytest.mark.parametrize("shape", [(3, 20, 9, 9), (4, 40, 5, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpu_chunks_on_three_workers(torch_backend, monkeypatch, dtype, light, shape, train):
    """The CPU path's per-sample chunks as attnfast._cpu_pool tasks on 3 workers (the batch-wide MLP, conv and
    BatchNorm between the phases single-threaded on a worker): as accurate as eager, channels_last included."""
    from attnfast import _cpu_pool

    CB = __import__("sys").modules["attnfast.ops.cbam"]
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 3)
    monkeypatch.setattr(_cpu_pool, "MIN_TASK_ELEMS", 0)  # these small samples: one per chunk
    monkeypatch.setattr(CB, "CPU_MIN_CHUNK_ELEMENTS", 0)
    assert len(CB._sample_chunks(torch.empty(shape))) == shape[0]
    check_cbam(shape, dtype, light, train, "cpu", channels_last=shape[3] == 3)
