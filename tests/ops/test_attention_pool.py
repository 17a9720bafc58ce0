"""attnfast::attention_pool (Learn to Pay Attention LinearAttentionBlock / timm GlobalContext pooling) against its
float64 reference (attnfast.reference.attention_pool), three-way: both paths (PyTorch, and the Triton kernels
interpreted on a CPU / compiled on CUDA), every g layout (none, pooled (B, C, 1, 1), (1, C, 1, 1), a map like l),
softmax/sigmoid, sum/mean, with and without a bias, contiguous and channels_last; opcheck; torch.compile; input
validation. bf16: tests/ops/test_bf16.py (refused on the interpreter, the PyTorch path vs float64). Shapes are tiny (the interpreter): several pixel tiles and splits all the same."""
import pytest
import torch

from attnfast.ops import attention_pool
from attnfast.ops.attention_pool import attention_pool_op
from attnfast.reference.attention_pool import attention_pool_reference
from op_checks import check_attention_pool, dtype_params

BACKENDS = ["triton_backend", "torch_backend"]
# (g layout, normalize, reduce, bias): LTPA (both modes), timm GlobalContext, the rest of the grid
VARIANTS = [("pooled", "softmax", "sum", False), ("pooled", "sigmoid", "mean", False), (None, "softmax", "sum", True),
            ("map", "softmax", "mean", True), ("pooled1", "sigmoid", "sum", True), ("map", "sigmoid", "mean", False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_variants(request, backend, dtype, variant, device):
    request.getfixturevalue(backend)
    g_kind, norm, red, bias = variant
    check_attention_pool(2, 5, 7, 11, dtype, g_kind=g_kind, normalize=norm, reduce=red, bias=bias, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16))
@pytest.mark.parametrize("variant", [VARIANTS[1], VARIANTS[3]], ids=lambda v: "-".join(map(str, v)))
def test_16bit(request, backend, dtype, variant, device):
    request.getfixturevalue(backend)
    g_kind, norm, red, bias = variant
    check_attention_pool(2, 70, 9, 8, dtype, g_kind=g_kind, normalize=norm, reduce=red, bias=bias, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g_kind", ["pooled", "map"])
def test_channels_last(request, backend, g_kind, device):
    request.getfixturevalue(backend)
    check_attention_pool(2, 66, 5, 6, torch.float32, g_kind=g_kind, bias=True, device=device, channels_last=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_softmax_many_tiles_only_pooled_grad(request, backend, device):
    """Logits of order 30 over 300 pixels (several tiles and splits: the online max moves), no gradient into c."""
    request.getfixturevalue(backend)
    check_attention_pool(3, 9, 15, 20, torch.float32, device=device, logit_scale=30.0, dc_on=False)


def test_nothing_c_h_w_sized_is_saved(torch_backend):
    """Saved for backward: the inputs, fp32 logits (B x HW), softmax max and sum (B x 2) and pooled (B x C), nothing else."""
    l = torch.randn(2, 8, 6, 5, requires_grad=True)
    w = torch.randn(1, 8, 1, 1, requires_grad=True)
    g = torch.randn(2, 8, 1, 1, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention_pool(l, w, None, g)
    assert sorted(shapes) == sorted([(2, 8, 6, 5), (1, 8, 1, 1), (2, 8, 1, 1), (2, 30), (2, 2), (2, 8)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride0_gradients_and_unused_outputs(request, backend, device):
    """``pooled.sum()`` sends a stride-0 gradient; c unused sends none (both paths read any strides)."""
    request.getfixturevalue(backend)
    l = torch.randn(2, 6, 4, 5, device=device, dtype=torch.float64).float()
    w = torch.randn(1, 6, 1, 1, device=device)
    want = []
    for fn in (attention_pool_reference, attention_pool):
        lv, wv = l.clone().requires_grad_(), w.clone().requires_grad_()
        fn(lv, wv, None, None, normalize="softmax", reduce="sum")[1].sum().backward()
        want.append((lv.grad, wv.grad))
    torch.testing.assert_close(want[1], want[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend, g_kind", [("triton_backend", "map"), ("torch_backend", "map"),
                                             ("torch_backend", None)])
def test_opcheck(request, backend, g_kind, device):
    request.getfixturevalue(backend)
    l = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    w = torch.randn(1, 3, 1, 1, device=device, requires_grad=True)
    b = torch.randn(1, device=device, requires_grad=True)
    g = torch.randn(2, 3, 4, 5, device=device, requires_grad=True) if g_kind else None
    torch.library.opcheck(attention_pool_op, (l, w, b, g, True, False))


def test_torch_compile_fullgraph(torch_backend):
    l, w = torch.randn(2, 3, 4, 5), torch.randn(1, 3, 1, 1)
    f = torch.compile(lambda a, b: attention_pool(a, b, normalize="sigmoid", reduce="mean")[1] * 2, fullgraph=True)
    torch.testing.assert_close(f(l, w), attention_pool_reference(l, w, normalize="sigmoid", reduce="mean")[1] * 2)


def test_bad_inputs():
    l, w = torch.randn(2, 3, 4, 5), torch.randn(1, 3, 1, 1)
    cases = [
        ((torch.randn(2, 3, 4), w), {}, "4-D"),
        ((l, torch.randn(2, 3, 1, 1)), {}, r"weight must be a 1x1 convolution weight to one channel, \(1, C, 1, 1\)"),
        ((l, torch.randn(1, 4, 1, 1)), {}, r"l must have 4 channels \(the weight's in_channels\); got 3"),
        ((l, w, torch.randn(2)), {}, "bias must hold one value"),
        ((l, w, None, torch.randn(2, 3, 2, 5)), {}, r"g must be the global feature, \(2, 3, 1, 1\)"),
        ((l, w.double()), {}, "dtype"),
        ((l, w), {"normalize": "softmax2d"}, "normalize must be one of softmax, sigmoid"),
        ((l, w), {"reduce": "max"}, "reduce must be one of sum, mean"),
        ((torch.randn(2, 3, 0, 5), w), {}, "at least one"),
        ((l.long(), w), {}, "floating"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            attention_pool(*args, **kw)


def test_pooled_output_may_be_modified_in_place_before_backward():
    """Eager's sum/avg-pool save no output: in-place dropout on pooled, then backward, works there and here."""
    torch.manual_seed(0)
    l = torch.randn(2, 8, 4, 4, requires_grad=True)
    w = torch.randn(1, 8, 1, 1, requires_grad=True)
    for normalize in ("softmax", "sigmoid"):
        c, pooled = attention_pool(l, w, normalize=normalize)
        pooled.mul_(0.5)
        (c.sum() + pooled.sum()).backward()
