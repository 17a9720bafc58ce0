"""attnfast::self_attention (SAGAN) against the float64 reference, both paths (Triton interpreted on CPU).

Forward and every gradient (x, query/key/value conv weights and biases, gamma) of
``SelfAttention2d`` versus ``attnfast.reference.SelfAttention``, three-way tolerance, fp32 and fp16,
32 randomized shapes (N = 1, N not a block multiple, non-square maps, more than 128 channels).
"""
import random

import pytest
import torch

from attnfast.nn.self_attention import SelfAttention2d
from attnfast.ops.self_attention import (chunk_rows, self_attention, self_attention_backward_op,
                                         self_attention_op)
from attnfast.reference.self_attention import SelfAttention
from attnfast.testing import BASE_ATOL, assert_close_3way

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


def _layers(c, gamma, dtype):
    ref64 = SelfAttention(c).double()
    with torch.no_grad():
        ref64.gamma.fill_(gamma)
        for conv in (ref64.query_conv, ref64.key_conv):  # logits of order 10: a peaked softmax
            conv.weight.mul_(3.0)
    eager = SelfAttention(c).to(dtype)
    eager.load_state_dict(ref64.state_dict())
    fused = SelfAttention2d(c).to(dtype)
    fused.load_state_dict(ref64.state_dict())
    return ref64, eager, fused


def _run(layer, x, grad):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, _ = layer(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for _, p in sorted(layer.named_parameters())]


def _check_module(shape, dtype, gamma=0.7):
    b, c, h, w = shape
    ref64, eager, fused = _layers(c, gamma, dtype)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    ref = _run(ref64, x, g)
    e = _run(eager, x.to(dtype), g.to(dtype))
    out = _run(fused, x.to(dtype), g.to(dtype))
    assert out[0].dtype == dtype
    names = ["out", "x.grad"] + [n + ".grad" for n, _ in sorted(fused.named_parameters())]
    for n, o, r, ee in zip(names, out, ref, e):
        # The key bias adds q_i^T b to a whole softmax row, so its exact gradient is 0 and the
        # computed one is pure rounding noise (a sum over N positions of rounded dK).
        # Compare it with factor 4 at the scale of the key weight gradient.
        if n == "key_conv.bias.grad":
            scale = max(1.0, ref[names.index("key_conv.weight.grad")].abs().max().item())
            assert_close_3way(o, r, ee, name=f"{n} {shape}", factor=4.0, atol=BASE_ATOL[dtype] * scale)
        else:
            assert_close_3way(o, r, ee, name=f"{n} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_module_matches_reference(request, backend, dtype, shape):
    request.getfixturevalue(backend)
    _check_module(shape, dtype)


def test_shapes_cover_edge_cases():
    ns = [h * w for _, _, h, w in SHAPES]
    assert len(SHAPES) >= 30 and 1 in ns
    assert any(n % 64 for n in ns) and any(h != w for _, _, h, w in SHAPES)
    assert any(c > 128 for _, c, _, _ in SHAPES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiple_chunks_and_blocks(request, backend, monkeypatch):
    """Several query chunks (PyTorch path) / several key and query blocks (Triton)."""
    request.getfixturevalue(backend)
    monkeypatch.setenv("ATTNFAST_SA_CHUNK_ELEMS", "3000")
    assert chunk_rows(2, 200, 200) == 7
    _check_module((2, 16, 20, 10), torch.float32)


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
def test_large_logits(request, backend, residual):
    """No scale, |q^T k| ~ 1e3: finite and as accurate as eager fp32."""
    request.getfixturevalue(backend)
    b, d, dv, n = 2, 4, 24, 70
    q = torch.randn(b, d, n, dtype=torch.float64) * 16
    k = torch.randn(b, d, n, dtype=torch.float64) * 16
    v = torch.randn(b, dv, n, dtype=torch.float64)
    x = torch.randn(b, dv, n, dtype=torch.float64) if residual else None
    gamma = torch.tensor([0.9], dtype=torch.float64) if residual else None
    logits = (q.transpose(1, 2) @ k).abs()
    assert logits.max() > 1e3
    grad = torch.randn(b, dv, n, dtype=torch.float64)
    tensors = (q, k, v, x, gamma)
    ref = _op_grads(lambda *t: _math64(*t, 1.0), tensors, grad)
    f32 = [t.float() if t is not None else None for t in tensors]
    eager = _op_grads(lambda *t: _math_eager(*t, 1.0), f32, grad.float())
    out = _op_grads(lambda *t: self_attention(*t, scale=1.0), f32, grad.float())
    for o in out:
        assert torch.isfinite(o).all()
    assert_close_3way(out, ref, eager, name="large logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_pooled_keys(request, backend):
    """Fewer keys than queries (the pooled variant) and a non-default scale, at op level."""
    request.getfixturevalue(backend)
    b, d, dv, nq, nk = 2, 5, 40, 90, 23
    tensors = (torch.randn(b, d, nq, dtype=torch.float64), torch.randn(b, d, nk, dtype=torch.float64),
               torch.randn(b, dv, nk, dtype=torch.float64), torch.randn(b, dv, nq, dtype=torch.float64),
               torch.tensor([-0.4], dtype=torch.float64))
    grad = torch.randn(b, dv, nq, dtype=torch.float64)
    ref = _op_grads(lambda *t: _math64(*t, 0.3), tensors, grad)
    for dtype in (torch.float32, torch.float16):
        ts = [t.to(dtype) for t in tensors]
        eager = _op_grads(lambda *t: _math_eager(*t, 0.3), ts, grad.to(dtype))
        out = _op_grads(lambda *t: self_attention(*t, scale=0.3), ts, grad.to(dtype))
        assert_close_3way(out, ref, eager, name=f"scale/pooled {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_stride0_grad(request, backend):
    """q/k/v as channel slices of one conv output, x channels_last, gradient from .sum() (stride 0)."""
    request.getfixturevalue(backend)
    b, c, h, w = 2, 16, 6, 7
    qkv = torch.randn(b, 2 * 2 + c, h, w, dtype=torch.float64).requires_grad_()
    x = torch.randn(b, c, h, w, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    gamma = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)

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
def test_opcheck(request, backend, residual):
    request.getfixturevalue(backend)
    b, d, dv, n = 2, 3, 20, 13
    q = torch.randn(b, d, n, requires_grad=True)
    k = torch.randn(b, d, n, requires_grad=True)
    v = torch.randn(b, dv, n, requires_grad=True)
    x = torch.randn(b, dv, n, requires_grad=True) if residual else None
    gamma = torch.tensor([0.6], requires_grad=True) if residual else None
    torch.library.opcheck(self_attention_op, (q, k, v, x, gamma, 0.8, True))
    out, o, lse = self_attention_op(q, k, v, x, gamma, 0.8, True)
    saved = o if residual else out
    args = (torch.randn(b, dv, n), q.detach(), k.detach(), v.detach(), saved.detach(), lse.detach(),
            gamma.detach() if residual else None, 0.8)
    torch.library.opcheck(self_attention_backward_op, args)


def test_no_grad_skips_saved_output(torch_backend):
    q, k, v = torch.randn(1, 2, 9), torch.randn(1, 2, 9), torch.randn(1, 4, 9)
    x, gamma = torch.randn(1, 4, 9), torch.tensor([0.3])
    out, o, lse = self_attention_op(q, k, v, x, gamma, 1.0, False)
    assert o.numel() == 0 and lse.shape == (1, 9)
    torch.testing.assert_close(out, _math_eager(q, k, v, x, gamma, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(request, backend):
    request.getfixturevalue(backend)
    torch._dynamo.reset()
    layer = SelfAttention2d(16, tuple_output=False)
    with torch.no_grad():
        layer.gamma.fill_(0.5)
    ref = SelfAttention(16)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
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


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (1, 256, 17, 23), (2, 128, 64, 64)], ids=str)
def test_bf16_gpu(shape, device):
    """bf16 (wrong in the interpreter): the Triton kernels on a GPU only."""
    b, c, h, w = shape
    ref64, eager, fused = _layers(c, 0.7, torch.bfloat16)
    ref64, eager, fused = ref64.to(device), eager.to(device), fused.to(device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    ref = _run(ref64, x, g)
    e = _run(eager, x.bfloat16(), g.bfloat16())
    out = _run(fused, x.bfloat16(), g.bfloat16())
    assert_close_3way(out, ref, e, name=f"bf16 {shape}")
