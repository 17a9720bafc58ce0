"""attnfast::grid_attention against the float64 reference, Triton (interpreted on CPU) and PyTorch paths.

Every case checks the forward (a, pooled) and all six gradients (l, g, W_l, W_g, phi.weight,
phi.bias) with the three-way rule: error vs float64 <= 2x eager PyTorch's error in the same dtype.
"""
import random

import pytest
import torch

from attnfast.nn.grid_attention import GridAttention
from attnfast.ops.grid_attention import grid_attention
from attnfast.reference.grid_attention import GridAttention as RefGridAttention
from attnfast.testing import assert_close_3way

BACKENDS = ["triton_backend", "torch_backend"]


def make_ref(C, Cg, A, up, normalize, seed=0):
    torch.manual_seed(seed)
    ref = RefGridAttention(C, Cg, A, up, normalize_attn=normalize).double()
    with torch.no_grad():
        ref.phi.bias.uniform_(-0.5, 0.5)
    return ref


def make_inputs(B, C, Cg, H, W, up, seed=1):
    gen = torch.Generator().manual_seed(seed)
    l = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    g = torch.randn(B, Cg, H // up, W // up, generator=gen, dtype=torch.float64)
    da = torch.randn(B, 1, H, W, generator=gen, dtype=torch.float64)
    dp = torch.randn(B, C, generator=gen, dtype=torch.float64)
    return l, g, da, dp


def run(module, l, g, da=None, dp=None, *, loss=None):
    """Forward + backward; returns (a, pooled, dl, dg, dW_l, dW_g, dphi_w, dphi_b)."""
    module.zero_grad(set_to_none=True)
    l = l.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    a, pooled = module(l, g)
    if loss is None:
        terms = []
        if da is not None:
            terms.append((a * da.to(a.dtype)).sum())
        if dp is not None:
            terms.append((pooled * dp.to(a.dtype)).sum())
        loss = sum(terms)
    else:
        loss = loss(a, pooled)
    loss.backward()
    return (a.detach(), pooled.detach(), l.grad, g.grad, module.W_l.weight.grad, module.W_g.weight.grad,
            module.phi.weight.grad, module.phi.bias.grad)


def three_modules(ref, dtype):
    eager = RefGridAttention(ref.in_features_l, ref.in_features_g, ref.attn_features, ref.up_factor,
                             ref.normalize_attn).to(dtype)
    eager.load_state_dict(ref.state_dict())
    fused = GridAttention(ref.in_features_l, ref.in_features_g, ref.attn_features, ref.up_factor,
                          ref.normalize_attn).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return eager, fused


def check_case(B, C, Cg, A, H, W, up, normalize, dtype, *, da_on=True, dp_on=True, channels_last=False,
               seed=0):
    ref = make_ref(C, Cg, A, up, normalize, seed)
    l, g, da, dp = make_inputs(B, C, Cg, H, W, up, seed + 1)
    da = da if da_on else None
    dp = dp if dp_on else None
    eager, fused = three_modules(ref, dtype)
    lq, gq = l.to(dtype), g.to(dtype)
    if channels_last:
        lq = lq.to(memory_format=torch.channels_last)
        gq = gq.to(memory_format=torch.channels_last)
    out64 = run(ref, l, g, da, dp)
    out_eager = run(eager, lq, gq, da, dp)
    out = run(fused, lq, gq, da, dp)
    for o in out:
        assert o.dtype == dtype
    assert_close_3way(out, out64, out_eager,
                      name=f"grid[B={B},C={C},Cg={Cg},A={A},{H}x{W},up={up},norm={normalize},{dtype}]")
    return out


def random_cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        up = rng.choice([1, 2, 4, 8])
        h = rng.randint(1, max(1, 28 // up))
        w = rng.randint(1, max(1, 28 // up))
        if rng.random() < 0.3:  # a few square AttnVGG-like maps
            w = h
        cases.append((rng.randint(1, 3), rng.choice([3, 8, 16, 24, 32]), rng.choice([4, 16, 32]),
                      rng.choice([8, 16, 32]), h * up, w * up, up, rng.random() < 0.5))
    return cases


RANDOM_FP32 = random_cases(32, 1234)
RANDOM_FP16 = random_cases(8, 99)
FIXED = [  # (B, C, Cg, A, H, W, up, normalize): AttnVGG-like maps, every up_factor, odd sizes
    (2, 32, 32, 32, 28, 28, 4, True), (2, 32, 32, 32, 14, 14, 2, False), (1, 16, 16, 16, 7, 7, 1, True),
    (2, 16, 24, 16, 24, 16, 8, True), (3, 24, 16, 32, 9, 15, 3, False), (1, 16, 16, 16, 1, 1, 1, True),
]


def _ids(cases):
    return [f"B{b}C{c}g{cg}A{a}_{h}x{w}_up{u}_{'sm' if n else 'sig'}" for b, c, cg, a, h, w, u, n in cases]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FIXED + RANDOM_FP32, ids=_ids(FIXED + RANDOM_FP32))
def test_fp32_matches_reference(request, backend, case):
    request.getfixturevalue(backend)
    check_case(*case, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FIXED[:2] + RANDOM_FP16, ids=_ids(FIXED[:2] + RANDOM_FP16))
def test_fp16_matches_reference(request, backend, case):
    request.getfixturevalue(backend)
    check_case(*case, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("which", ["a_only", "pooled_only"])
def test_gradient_on_one_output(request, backend, normalize, which):
    request.getfixturevalue(backend)
    check_case(2, 16, 16, 16, 12, 10, 2, normalize, torch.float32,
               da_on=which == "a_only", dp_on=which == "pooled_only")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_channels_last(request, backend, normalize):
    request.getfixturevalue(backend)
    out = check_case(2, 24, 16, 16, 12, 12, 4, normalize, torch.float32, channels_last=True)
    assert out[2].shape == (2, 24, 12, 12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_sum_gradient_stride0(request, backend, normalize):
    """``a.sum() + pooled.sum()``: both upstream gradients arrive as stride-0 expanded scalars."""
    request.getfixturevalue(backend)
    ref = make_ref(16, 16, 16, 2, normalize)
    l, g, _, _ = make_inputs(2, 16, 16, 14, 10, 2)
    eager, fused = three_modules(ref, torch.float32)
    loss = lambda a, p: a.sum() + p.sum()  # noqa: E731
    assert_close_3way(run(fused, l.float(), g.float(), loss=loss), run(ref, l, g, loss=loss),
                      run(eager, l.float(), g.float(), loss=loss), name="sum-loss")


def test_non_dense_inputs(triton_backend):
    ref = make_ref(8, 16, 16, 2, True)
    big = torch.randn(2, 16, 12, 20, dtype=torch.float64)
    l = big[:, ::2, :, ::2]  # (2, 8, 12, 10), non-contiguous
    g = torch.randn(2, 16, 5, 6, dtype=torch.float64).transpose(2, 3)  # (2, 16, 6, 5)
    eager, fused = three_modules(ref, torch.float32)
    assert_close_3way(run(fused, l.float(), g.float(), loss=lambda a, p: (a * a).sum() + p.square().sum()),
                      run(ref, l, g, loss=lambda a, p: (a * a).sum() + p.square().sum()),
                      run(eager, l.float(), g.float(), loss=lambda a, p: (a * a).sum() + p.square().sum()))


def test_backends_agree_and_splits(triton_backend, monkeypatch):
    """A map with many pixel tiles (several H*W splits per sample) gives the PyTorch path's result."""
    ref = make_ref(16, 16, 16, 1, True)
    l, g, da, dp = make_inputs(1, 16, 16, 28, 28, 1)
    _, fused = three_modules(ref, torch.float32)
    out_triton = run(fused, l.float(), g.float(), da, dp)
    monkeypatch.setenv("ATTNFAST_BACKEND", "torch")
    out_torch = run(fused, l.float(), g.float(), da, dp)
    for x, y in zip(out_triton, out_torch):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_memory_is_small(request, backend):
    """Nothing of size A x H x W is saved for backward: only inputs, weights and B*(H*W + C + 1) floats."""
    request.getfixturevalue(backend)
    B, C, Cg, A, H, W, up = 2, 8, 8, 32, 12, 12, 2
    fused = GridAttention(C, Cg, A, up)
    l = torch.randn(B, C, H, W, requires_grad=True)
    g = torch.randn(B, Cg, H // up, W // up, requires_grad=True)
    inputs = {t.data_ptr() for t in (l, g, *fused.parameters())}
    extra = []

    def pack(t):
        if t.data_ptr() not in inputs:
            extra.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a, pooled = fused(l, g)
    assert sum(extra) <= B * (H * W + C + 1), f"saved non-input tensors: {extra}"
    assert A * H * W > B * (H * W + C + 1)  # the bound would catch one A x H x W intermediate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(request, backend, normalize):
    request.getfixturevalue(backend)
    torch.manual_seed(0)
    m = GridAttention(8, 16, 16, 2, normalize_attn=normalize)
    l = torch.randn(2, 8, 6, 4, requires_grad=True)
    g = torch.randn(2, 16, 3, 2, requires_grad=True)
    args = (l, g, m.W_l.weight, m.W_g.weight, m.phi.weight, m.phi.bias, 2, normalize)
    torch.library.opcheck(torch.ops.attnfast.grid_attention.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(request, backend):
    request.getfixturevalue(backend)
    torch.manual_seed(0)
    m = GridAttention(8, 16, 16, 2, normalize_attn=True)
    l = torch.randn(2, 8, 6, 4)
    g = torch.randn(2, 16, 3, 2)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)  # default inductor backend
    eager_out = run(m, l, g, loss=lambda a, p: (a * 3).sum() + p.square().sum())
    compiled_out = run(compiled, l, g, loss=lambda a, p: (a * 3).sum() + p.square().sum())
    for x, y in zip(compiled_out, eager_out):
        torch.testing.assert_close(x, y)


def test_functional_validates():
    m = GridAttention(8, 16, 16, 2)
    l = torch.randn(1, 8, 4, 4)
    g = torch.randn(1, 16, 2, 2)
    params = (m.W_l.weight, m.W_g.weight, m.phi.weight, m.phi.bias)
    with pytest.raises(ValueError, match="up_factor"):
        grid_attention(l, g, *params, 4)
    with pytest.raises(ValueError, match="channels"):
        grid_attention(l[:, :4], g, *params, 2)
    with pytest.raises(ValueError, match="attn_features"):
        grid_attention(l, g, m.W_l.weight, m.W_g.weight[:8], m.phi.weight, m.phi.bias, 2)
    with pytest.raises(ValueError, match="dtype"):
        grid_attention(l, g, m.W_l.weight.half(), *params[1:], 2)
    with pytest.raises(ValueError, match="positive integer"):
        grid_attention(l, g, *params, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_matches_reference(normalize, dtype):
    """On a GPU: AttnVGG pool-3 / pool-4 sized blocks (real channel counts), Triton kernels."""
    for B, C, Cg, A, H, up in ((4, 256, 512, 256, 28, 4), (2, 512, 512, 256, 14, 2), (2, 64, 64, 48, 17, 1)):
        ref = make_ref(C, Cg, A, up, normalize).cuda()
        l, g, da, dp = (t.cuda() for t in make_inputs(B, C, Cg, H, H, up))
        eager, fused = three_modules(ref, dtype)
        assert_close_3way(run(fused, l.to(dtype), g.to(dtype), da, dp), run(ref, l, g, da, dp),
                          run(eager, l.to(dtype), g.to(dtype), da, dp), name=f"gpu[{C},{H},{dtype}]")
