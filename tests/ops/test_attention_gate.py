"""attnfast::attention_gate_logits and attnfast::attention_gate_mul against float64: the Triton kernels
(interpreted on a CPU, compiled on CUDA) and the PyTorch path, named outputs and gradients, contiguous and
channels_last; opcheck; validation; and what the PyTorch path keeps for backward (no F_int x H x W tensor).

Shapes: MONAI's gate (k = 1, g at x's size), Attention-Gated-Networks' (k = 2, g resized bilinearly to theta's
grid, a remainder row/column of x outside every patch, F_int not a power of two).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from attnfast.ops import attention_gate, attention_gate_logits, gate
from attnfast.ops.attention_gate import (attention_gate_logits_backward_op, attention_gate_logits_op,
                                         gate_backward_op, gate_op)
from attnfast.testing import assert_close_3way
from op_checks import dtype_params

BACKENDS = ["triton_backend", "torch_backend"]
CASES = {  # B, C, CG, H, W, h, w, F_int, k
    "monai": (2, 5, 6, 6, 5, 6, 5, 4, 1),
    "agn": (2, 6, 5, 9, 8, 3, 2, 20, 2),
    "agn_same_grid": (1, 3, 4, 8, 8, 4, 4, 8, 2),
}
ag_ops = importlib.import_module("attnfast.ops.attention_gate")  # the package exports the function by that name
NAMES = ["logits", "dx", "dg", "dw_x", "dw_g", "dbias", "dpsi_w", "dpsi_b"]


def logits_eager(x, g, w_x, w_g, bias, psi_w, psi_b, k):
    """The gate's logits as the projects compute them: conv theta, 1x1 phi (+ bias) resized, relu, psi."""
    theta = F.conv2d(x, w_x, stride=k)
    phi = F.conv2d(g, w_g.view(*w_g.shape, 1, 1), bias)
    if phi.shape[2:] != theta.shape[2:]:
        phi = F.interpolate(phi, size=theta.shape[2:], mode="bilinear", align_corners=False)
    return F.conv2d(F.relu(theta + phi), psi_w.view(1, -1, 1, 1), psi_b)


def make(case, device, seed=0):
    B, C, CG, H, W, h, w, Fi, k = CASES[case]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(device)

    inputs = [rnd(B, C, H, W), rnd(B, CG, h, w), rnd(Fi, C, k, k, scale=0.5), rnd(Fi, CG, scale=0.5),
              rnd(Fi, scale=0.5), rnd(Fi), rnd(1)]
    return inputs, k, rnd(B, 1, H // k, W // k)


def run(fn, inputs, k, up, dtype, channels_last=False):
    leaves = []
    for i, t in enumerate(inputs):
        t = t.to(dtype)
        if channels_last and i < 2:
            t = t.to(memory_format=torch.channels_last)
        leaves.append(t.detach().requires_grad_())
    out = fn(*leaves, k)
    out.backward(up.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_float64(request, backend, dtype, case, device):
    request.getfixturevalue(backend)
    inputs, k, up = make(case, device)
    ref = run(logits_eager, inputs, k, up, torch.float64)
    eager = run(logits_eager, inputs, k, up, dtype)
    out = run(attention_gate_logits, inputs, k, up, dtype)
    assert out[0].dtype == torch.float32 and all(o.dtype == dtype for o in out[1:])
    for name, o, r, e in zip(NAMES, out, ref, eager):
        assert_close_3way(o.float(), r, e.float(), name=f"{case} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["monai", "agn"])
def test_logits_channels_last(request, backend, case, device):
    request.getfixturevalue(backend)
    inputs, k, up = make(case, device, seed=3)
    ref = run(logits_eager, inputs, k, up, torch.float64)
    eager = run(logits_eager, inputs, k, up, torch.float32, channels_last=True)
    out = run(attention_gate_logits, inputs, k, up, torch.float32, channels_last=True)
    assert out[1].is_contiguous(memory_format=torch.channels_last), "dx keeps x's channels_last layout"
    assert_close_3way(out, ref, eager, name=f"{case} channels_last")


@pytest.mark.parametrize("workers", [1, 3])
def test_torch_path_chunks(torch_backend, monkeypatch, workers):
    """Batch chunks of the PyTorch path (forward and recomputing backward), as attnfast._cpu_pool tasks inline or
    on 3 workers, give the one-chunk result."""
    from attnfast import _cpu_pool

    inputs, k, up = make("agn", "cpu")
    inputs[0] = torch.cat([inputs[0]] * 3)
    inputs[1] = torch.cat([inputs[1]] * 3)
    up = torch.cat([up] * 3)
    monkeypatch.setattr(ag_ops, "CPU_CHUNK_ELEMENTS", 1 << 40)
    monkeypatch.setattr(_cpu_pool, "TASKS_PER_WORKER", 1)
    monkeypatch.setattr(_cpu_pool, "workers", lambda: 1)
    assert ag_ops._chunks(3, 10, torch.device("cpu")) == [(0, 3)]
    whole = run(attention_gate_logits, inputs, k, up, torch.float64)
    monkeypatch.setattr(ag_ops, "CPU_CHUNK_ELEMENTS", 1)  # one sample per chunk
    monkeypatch.setattr(_cpu_pool, "MIN_TASK_ELEMS", 0)
    assert ag_ops._chunks(3, 10, torch.device("cpu")) == [(0, 1), (1, 2), (2, 3)]
    monkeypatch.setattr(_cpu_pool, "workers", lambda: workers)
    for a, b in zip(run(attention_gate_logits, inputs, k, up, torch.float64), whole):
        torch.testing.assert_close(a, b)


def _gate_run(fn, x, m, dy, dtype, channels_last):
    x, m = x.detach().to(dtype, copy=True), m.detach().to(dtype, copy=True)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x, m = x.requires_grad_(), m.requires_grad_()
    y = fn(x, m)
    y.backward(dy.to(dtype))
    return [y.detach(), x.grad, m.grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_matches_float64(request, backend, dtype, channels_last, device):
    request.getfixturevalue(backend)
    x, dy = torch.randn(2, 19, 5, 7, dtype=torch.float64, device=device), torch.randn(2, 19, 5, 7, device=device)
    m = torch.rand(2, 1, 5, 7, dtype=torch.float64, device=device)
    ref = _gate_run(torch.mul, x, m, dy.double(), torch.float64, False)
    eager = _gate_run(torch.mul, x, m, dy, dtype, channels_last)
    out = _gate_run(gate, x, m, dy, dtype, channels_last)
    if channels_last:
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    assert_close_3way(out, ref, eager, name=f"gate {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax", [False, True])
def test_attention_gate_function(request, backend, softmax, device):
    """``attention_gate``: map = resize(sigmoid or softmax(logits)) to x, output x * map."""
    request.getfixturevalue(backend)
    inputs, k, _ = make("agn", device)
    x = inputs[0].float()
    y, att = attention_gate(x, *[t.float() for t in inputs[1:]], stride=k, softmax=softmax)
    logits = logits_eager(*inputs, k)
    ref = torch.softmax(logits.flatten(1), 1).view(logits.shape) if softmax else torch.sigmoid(logits)
    ref = F.interpolate(ref, size=x.shape[2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(att.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), inputs[0] * ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(request, backend, device):
    request.getfixturevalue(backend)
    inputs, k, up = make("agn", device)
    inputs = [t.float().requires_grad_() for t in inputs]
    torch.library.opcheck(attention_gate_logits_op, (*inputs, k))
    torch.library.opcheck(attention_gate_logits_backward_op, (up.float(), *[t.detach() for t in inputs], k))
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    m = torch.rand(2, 1, 4, 5, device=device, requires_grad=True)
    torch.library.opcheck(gate_op, (x, m))
    torch.library.opcheck(gate_backward_op, (torch.randn(2, 3, 4, 5, device=device), x.detach(), m.detach()))


def _saved_numels(fn, *args):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sizes


@pytest.mark.parametrize("fn, fails", [(attention_gate_logits, False), (logits_eager, True)], ids=["fused", "eager"])
def test_nothing_f_int_sized_is_saved(torch_backend, fn, fails):
    """F_int = 16 > C = C_g = 2: anything F_int-sized the backward keeps exceeds x's and g's size. The eager
    composition keeps several such tensors (the check can fail); the op keeps its inputs only."""
    B, C, H, W, Fi = 2, 2, 8, 8, 16
    x, g = torch.randn(B, C, H, W, requires_grad=True), torch.randn(B, C, H // 2, W // 2, requires_grad=True)
    params = [torch.randn(Fi, C, 2, 2, requires_grad=True), torch.randn(Fi, C, requires_grad=True),
              torch.randn(Fi, requires_grad=True), torch.randn(Fi, requires_grad=True), torch.randn(1, requires_grad=True)]
    big = [n for n in _saved_numels(fn, x, g, *params, 2) if n > x.numel()]
    assert bool(big) == fails, big


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(2, a[2][:, :, :1, :1]), r"w_x must be a 2x2 convolution weight"),
    (lambda a: a.__setitem__(2, a[2][:, :2]), "x must have 2 channels"),
    (lambda a: a.__setitem__(3, a[3][:2]), r"w_g must be a 1x1 convolution weight \(20, C_g"),
    (lambda a: a.__setitem__(3, a[3][:, :2]), "g must have 2 channels"),
    (lambda a: a.__setitem__(5, a[5][:3]), "psi_w must have 20 elements"),
    (lambda a: a.__setitem__(1, a[1][:1]), "same batch size"),
    (lambda a: a.__setitem__(1, a[1].half()), "all inputs must share one dtype"),
    (lambda a: a.__setitem__(0, a[0][..., :1]), "x must be at least 2x2"),
    (lambda a: a.__setitem__(7, 0), "stride must be a positive integer"),
    (lambda a: a.__setitem__(0, a[0][0]), "x must be a 4-D tensor"),
])
def test_validation(change, match):
    inputs, k, _ = make("agn", "cpu")
    args = [t.float() for t in inputs] + [k]
    change(args)
    with pytest.raises(ValueError, match=match):
        attention_gate_logits(*args)


def test_gate_validation():
    with pytest.raises(ValueError, match=r"map must be \(B, 1, H, W\)"):
        gate(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))


def test_channel_moments_twice_differentiable_on_cpu():
    """channel_moments is differentiable, backward included (create_graph=True), as its eager formula."""
    from attnfast.ops.attention_gate import channel_moments

    v = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    mean, cov = channel_moments(v)
    (dv,) = torch.autograd.grad((mean.square().sum() + cov.square().sum()), v, create_graph=True)
    assert dv.requires_grad
    vf = v.flatten(2).transpose(0, 1).reshape(4, -1)
    m_ref = vf.mean(1)
    c_ref = (vf - m_ref[:, None]) @ (vf - m_ref[:, None]).T / vf.shape[1]
    (dv_ref,) = torch.autograd.grad((m_ref.square().sum() + c_ref.square().sum()), v, create_graph=True)
    torch.testing.assert_close(dv, dv_ref)
    torch.testing.assert_close(torch.autograd.grad(dv.square().sum(), v)[0],
                               torch.autograd.grad(dv_ref.square().sum(), v)[0])
