"""attnfast::grid_attention against the float64 reference, Triton and PyTorch paths, on the test device.

Every case checks the forward (a, pooled) and all six gradients (l, g, W_l, W_g, phi.weight,
phi.bias) with the three-way rule: error vs float64 <= 2x eager PyTorch's error in the same dtype
(``op_checks.check_grid``). The tests take the ``device`` fixture: on a CPU the Triton kernels run
in the interpreter, on a GPU machine the same cases run the compiled kernels on CUDA (bf16 there only).
AttnVGG's real shapes are in tests/gpu/test_real_shapes.py.
"""
import random

import pytest
import torch

import attnfast.config

from attnfast.nn.grid_attention import GridAttention
from attnfast.ops.grid_attention import grid_attention
from attnfast.testing import assert_close_3way
from op_checks import check_grid, dtype_params, grid_inputs, grid_modules, grid_ref, grid_run

BACKENDS = ["triton_backend", "torch_backend"]


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
def test_fp32_matches_reference(request, backend, case, device):
    request.getfixturevalue(backend)
    check_grid(*case, torch.float32, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", FIXED[:2] + RANDOM_FP16, ids=_ids(FIXED[:2] + RANDOM_FP16))
def test_16bit_matches_reference(request, backend, case, dtype, device):
    request.getfixturevalue(backend)
    check_grid(*case, dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("which", ["a_only", "pooled_only"])
def test_gradient_on_one_output(request, backend, normalize, which, device):
    request.getfixturevalue(backend)
    check_grid(2, 16, 16, 16, 12, 10, 2, normalize, torch.float32, device=device,
               da_on=which == "a_only", dp_on=which == "pooled_only")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_channels_last(request, backend, normalize, device):
    request.getfixturevalue(backend)
    out = check_grid(2, 24, 16, 16, 12, 12, 4, normalize, torch.float32, device=device, channels_last=True)
    assert out[2].shape == (2, 24, 12, 12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_sum_gradient_stride0(request, backend, normalize, device):
    """``a.sum() + pooled.sum()``: both upstream gradients arrive as stride-0 expanded scalars."""
    request.getfixturevalue(backend)
    ref = grid_ref(16, 16, 16, 2, normalize, device=device)
    l, g, _, _ = grid_inputs(2, 16, 16, 14, 10, 2, device=device)
    eager, fused = grid_modules(ref, torch.float32)
    loss = lambda a, p: a.sum() + p.sum()  # noqa: E731
    assert_close_3way(grid_run(fused, l.float(), g.float(), loss=loss), grid_run(ref, l, g, loss=loss),
                      grid_run(eager, l.float(), g.float(), loss=loss), name="sum-loss")


def test_non_dense_inputs(triton_backend, device):
    ref = grid_ref(8, 16, 16, 2, True, device=device)
    big = torch.randn(2, 16, 12, 20, dtype=torch.float64, device=device)
    l = big[:, ::2, :, ::2]  # (2, 8, 12, 10), non-contiguous
    g = torch.randn(2, 16, 5, 6, dtype=torch.float64, device=device).transpose(2, 3)  # (2, 16, 6, 5)
    eager, fused = grid_modules(ref, torch.float32)
    loss = lambda a, p: (a * a).sum() + p.square().sum()  # noqa: E731
    assert_close_3way(grid_run(fused, l.float(), g.float(), loss=loss), grid_run(ref, l, g, loss=loss),
                      grid_run(eager, l.float(), g.float(), loss=loss))


def test_backends_agree_and_splits(triton_backend, monkeypatch, device):
    """A map with many pixel tiles (several H*W splits per sample) gives the PyTorch path's result."""
    ref = grid_ref(16, 16, 16, 1, True, device=device)
    l, g, da, dp = grid_inputs(1, 16, 16, 28, 28, 1, device=device)
    _, fused = grid_modules(ref, torch.float32)
    out_triton = grid_run(fused, l.float(), g.float(), da, dp)
    monkeypatch.setattr(attnfast.config, "BACKEND", "torch")
    out_torch = grid_run(fused, l.float(), g.float(), da, dp)
    for x, y in zip(out_triton, out_torch):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_memory_is_small(request, backend, device):
    """Nothing of size A x H x W is saved for backward: only inputs, weights and B*(H*W + C + 1) floats."""
    request.getfixturevalue(backend)
    B, C, Cg, A, H, W, up = 2, 8, 8, 32, 12, 12, 2
    fused = GridAttention(C, Cg, A, up).to(device)
    l = torch.randn(B, C, H, W, device=device, requires_grad=True)
    g = torch.randn(B, Cg, H // up, W // up, device=device, requires_grad=True)
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
def test_opcheck(request, backend, normalize, device):
    request.getfixturevalue(backend)
    torch.manual_seed(0)
    m = GridAttention(8, 16, 16, 2, normalize_attn=normalize).to(device)
    l = torch.randn(2, 8, 6, 4, device=device, requires_grad=True)
    g = torch.randn(2, 16, 3, 2, device=device, requires_grad=True)
    args = (l, g, m.W_l.weight, m.W_g.weight, m.phi.weight, m.phi.bias, 2, normalize)
    torch.library.opcheck(torch.ops.attnfast.grid_attention.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(request, backend, device):
    request.getfixturevalue(backend)
    torch.manual_seed(0)
    m = GridAttention(8, 16, 16, 2, normalize_attn=True).to(device)
    l = torch.randn(2, 8, 6, 4, device=device)
    g = torch.randn(2, 16, 3, 2, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)  # default inductor backend
    loss = lambda a, p: (a * 3).sum() + p.square().sum()  # noqa: E731
    for x, y in zip(grid_run(compiled, l, g, loss=loss), grid_run(m, l, g, loss=loss)):
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



def test_logits_may_be_modified_in_place_before_backward():
    """Eager's c (the phi conv output) is saved by nothing: scaling it in place before backward works there and here."""
    from attnfast.ops import grid_attention as grid_op
    torch.manual_seed(0)
    l = torch.randn(2, 4, 4, 4, requires_grad=True)
    g = torch.randn(2, 6, 2, 2, requires_grad=True)
    w_l, w_g, phi_w, phi_b = torch.randn(8, 4), torch.randn(8, 6), torch.randn(1, 8), torch.randn(1)
    c, pooled = grid_op(l, g, w_l, w_g, phi_w, phi_b, 2, True, return_logits=True)
    c.mul_(0.5)
    (c.sum() + pooled.sum()).backward()


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("case", FIXED[:5], ids=_ids(FIXED[:5]))
def test_cpu_tasks_match_reference_and_repeat(torch_backend, monkeypatch, workers, case):
    """The CPU path's chunks as attnfast._cpu_pool tasks, one sample each, inline or on 3 workers (with
    CPU_INFLIGHT_ELEMENTS small: at most 2 at once): as accurate as eager, and two runs give the same bits
    (partial dW_l / dphi sums in chunk order)."""
    from attnfast import _cpu_pool

    GA = __import__("sys").modules["attnfast.ops.grid_attention"]
    monkeypatch.setattr(GA, "CPU_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(_cpu_pool, "MIN_TASK_ELEMS", 0)
    B, _, _, A, H, W = case[:6]
    monkeypatch.setattr(GA, "CPU_INFLIGHT_ELEMENTS", 2 * max(A, case[1]) * H * W)
    monkeypatch.setattr(_cpu_pool, "workers", lambda: workers)
    runs = [check_grid(*case, torch.float32) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
