"""attnfast::self_attention (SAGAN) against the float64 reference, both paths, on the test device.

Forward and every gradient (x, query/key/value conv weights and biases, gamma) of
``SelfAttention2d`` versus ``attnfast.reference.SelfAttention``, three-way tolerance, fp32 and fp16
(bf16 on a GPU), 32 randomized shapes (N = 1, N not a block multiple, non-square maps, more than 128
channels). The tests take the ``device`` fixture: Triton interpreted on a CPU, compiled on CUDA on a
GPU machine. SAGAN's real shapes are in tests/gpu/test_real_shapes.py.
"""
import random
import sys

import pytest
import torch

from attnfast.nn.self_attention import SelfAttention2d
from attnfast.ops.self_attention import (chunk_rows, self_attention, self_attention_backward_op,
                                         self_attention_op)
from attnfast.reference.self_attention import SelfAttention
from attnfast.testing import BASE_ATOL, assert_close_3way
from op_checks import check_sagan, dtype_params

SA = sys.modules["attnfast.ops.self_attention"]  # the package re-exports the function under that name

BACKENDS = ["triton_backend", "torch_backend"]


def _random_shapes(n=32, seed=1234):
    rng = random.Random(seed)
    shapes = [(1, 8, 1, 1), (2, 5, 1, 3), (1, 136, 3, 5), (2, 16, 9, 11), (1, 24, 16, 13)]  # N=1, tiny C, DV > 128
    while len(shapes) < n:
        b = rng.choice([1, 2, 3])
        c = rng.choice([1, 3, 8, 12, 16, 20, 33, 40, 64])
        h, w = rng.randint(1, 14), rng.randint(1, 14)
        shapes.append((b, c, h, w))
    return shapes


SHAPES = _random_shapes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_module_matches_reference(request, backend, dtype, shape, device):
    request.getfixturevalue(backend)
    check_sagan(shape, dtype, device=device)


def test_shapes_cover_edge_cases():
    ns = [h * w for _, _, h, w in SHAPES]
    assert len(SHAPES) >= 30 and 1 in ns
    assert any(n % 64 for n in ns) and any(h != w for _, _, h, w in SHAPES)
    assert any(c > 128 for _, c, _, _ in SHAPES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiple_chunks_and_blocks(request, backend, monkeypatch, device):
    """Several query chunks (PyTorch path) / several key and query blocks (Triton)."""
    request.getfixturevalue(backend)
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", 3000)
    assert chunk_rows(2, 200, 200) == 7
    check_sagan((2, 16, 20, 10), torch.float32, device=device)


def _math64(q, k, v, x, gamma, scale):
    s = scale * q.double().transpose(1, 2) @ k.double()
    o = v.double() @ torch.softmax(s, -1).transpose(1, 2)
    return o if x is None else gamma.double() * o + x.double()


def _math_eager(q, k, v, x, gamma, scale):
    o = v @ torch.softmax(scale * q.transpose(1, 2) @ k, -1).transpose(1, 2)
    return o if x is None else gamma * o + x


def _op_grads(fn, tensors, grad):
    ts = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*ts)
    leaves = [t for t in ts if t is not None]
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [True, False])
def test_large_logits(request, backend, residual, device):
    """No scale, |q^T k| ~ 1e3: finite and as accurate as eager fp32, plus what every flash-style backward adds.

    The backward recomputes ``P = exp(S - lse)`` from the saved fp32 log-sum-exp. At |lse| ~ 1e3, rounding lse
    to fp32 moves every recomputed probability by up to ``u * |lse|`` relative (u = 2**-24; ~1e-4 here) on top of
    the rounding of S that eager has too, so the gradients get that much on top of the three-way bound (in
    units of the reference's magnitude, like the bound's atol). A wrong lse or P is off by far more."""
    request.getfixturevalue(backend)
    b, d, dv, n = 2, 4, 24, 70
    q = torch.randn(b, d, n, dtype=torch.float64, device=device) * 16
    k = torch.randn(b, d, n, dtype=torch.float64, device=device) * 16
    v = torch.randn(b, dv, n, dtype=torch.float64, device=device)
    x = torch.randn(b, dv, n, dtype=torch.float64, device=device) if residual else None
    gamma = torch.tensor([0.9], dtype=torch.float64, device=device) if residual else None
    logits = (q.transpose(1, 2) @ k).abs()
    assert logits.max() > 1e3
    grad = torch.randn(b, dv, n, dtype=torch.float64, device=device)
    tensors = (q, k, v, x, gamma)
    ref = _op_grads(lambda *t: _math64(*t, 1.0), tensors, grad)
    f32 = [t.float() if t is not None else None for t in tensors]
    eager = _op_grads(lambda *t: _math_eager(*t, 1.0), f32, grad.float())
    out = _op_grads(lambda *t: self_attention(*t, scale=1.0), f32, grad.float())
    for o in out:
        assert torch.isfinite(o).all()
    lse_max = torch.logsumexp(q.transpose(1, 2) @ k, dim=-1).abs().max().item()
    atol = BASE_ATOL[torch.float32] + 2.0 ** -24 * lse_max
    assert_close_3way(out[:1], ref[:1], eager[:1], name="large logits, output")  # the forward needs no lse
    assert_close_3way(out[1:], ref[1:], eager[1:], atol=atol, name="large logits, gradients")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
def test_scale_and_pooled_keys(request, backend, dtype, device):
    """Fewer keys than queries (the pooled variant) and a non-default scale, at op level."""
    request.getfixturevalue(backend)
    b, d, dv, nq, nk = 2, 5, 40, 90, 23
    f64 = dict(dtype=torch.float64, device=device)
    tensors = (torch.randn(b, d, nq, **f64), torch.randn(b, d, nk, **f64), torch.randn(b, dv, nk, **f64),
               torch.randn(b, dv, nq, **f64), torch.tensor([-0.4], **f64))
    grad = torch.randn(b, dv, nq, **f64)
    ref = _op_grads(lambda *t: _math64(*t, 0.3), tensors, grad)
    ts = [t.to(dtype) for t in tensors]
    eager = _op_grads(lambda *t: _math_eager(*t, 0.3), ts, grad.to(dtype))
    out = _op_grads(lambda *t: self_attention(*t, scale=0.3), ts, grad.to(dtype))
    assert_close_3way(out, ref, eager, name=f"scale/pooled {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_stride0_grad(request, backend, device):
    """q/k/v as channel slices of one conv output, x channels_last, gradient from .sum() (stride 0)."""
    request.getfixturevalue(backend)
    b, c, h, w = 2, 16, 6, 7
    qkv = torch.randn(b, 2 * 2 + c, h, w, dtype=torch.float64, device=device).requires_grad_()
    x = torch.randn(b, c, h, w, dtype=torch.float64, device=device)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    gamma = torch.tensor([0.5], dtype=torch.float64, device=device, requires_grad=True)

    def run(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (qkv, x, gamma)]
        t, xx = leaves[0].flatten(2), leaves[1].flatten(2)
        q, k, v = t[:, :2], t[:, 2:4], t[:, 4:]
        assert not q.is_contiguous()
        out = fn(q, k, v, xx, leaves[2], 1.0)
        return [out.detach()] + list(torch.autograd.grad(out.sum(), leaves))

    ref = run(torch.float64, _math64)
    eager = run(torch.float32, _math_eager)
    out = run(torch.float32, lambda *a: self_attention(*a[:5], scale=a[5]))
    assert_close_3way(out, ref, eager, name="strided")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [True, False])
def test_opcheck(request, backend, residual, device):
    request.getfixturevalue(backend)
    b, d, dv, n = 2, 3, 20, 13
    q = torch.randn(b, d, n, requires_grad=True, device=device)
    k = torch.randn(b, d, n, requires_grad=True, device=device)
    v = torch.randn(b, dv, n, requires_grad=True, device=device)
    x = torch.randn(b, dv, n, requires_grad=True, device=device) if residual else None
    gamma = torch.tensor([0.6], requires_grad=True, device=device) if residual else None
    torch.library.opcheck(self_attention_op, (q, k, v, x, gamma, 0.8, True))
    out, o, lse = self_attention_op(q, k, v, x, gamma, 0.8, True)
    saved = o if residual else out
    args = (torch.randn(b, dv, n, device=device), q.detach(), k.detach(), v.detach(), saved.detach(),
            lse.detach(), gamma.detach() if residual else None, 0.8)
    torch.library.opcheck(self_attention_backward_op, args)


def test_no_grad_skips_saved_output(torch_backend, device):
    q, k, v = (torch.randn(1, c, 9, device=device) for c in (2, 2, 4))
    x, gamma = torch.randn(1, 4, 9, device=device), torch.tensor([0.3], device=device)
    out, o, lse = self_attention_op(q, k, v, x, gamma, 1.0, False)
    assert o.numel() == 0 and lse.shape == (1, 9)
    torch.testing.assert_close(out, _math_eager(q, k, v, x, gamma, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(request, backend, device):
    request.getfixturevalue(backend)
    torch._dynamo.reset()
    layer = SelfAttention2d(16, tuple_output=False).to(device)
    with torch.no_grad():
        layer.gamma.fill_(0.5)
    ref = SelfAttention(16).to(device)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 5, 6, requires_grad=True, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    out_ref, _ = ref(x)
    out_ref.sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.gamma.grad, ref.gamma.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=torch.randn(2, 3)), "3-D"),
    (dict(k=torch.randn(2, 4, 9)), "k must be"),
    (dict(v=torch.randn(2, 6, 8)), "v must be"),
    (dict(x=torch.randn(2, 6, 8)), "x must be"),
    (dict(gamma=None), "together"),
    (dict(gamma=torch.ones(2)), "exactly one"),
    (dict(v=torch.randn(2, 6, 9, dtype=torch.float64)), "dtype"),
    (dict(q=torch.ones(2, 3, 9, dtype=torch.long)), "floating"),
])
def test_bad_input(kwargs, match):
    args = dict(q=torch.randn(2, 3, 9), k=torch.randn(2, 3, 9), v=torch.randn(2, 6, 9),
                x=torch.randn(2, 6, 9), gamma=torch.ones(1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        self_attention(**args)

