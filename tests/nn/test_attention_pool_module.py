"""The attention-pool modules against what they replace: attnfast.nn.LinearAttentionBlock vs Learn to Pay
Attention's LinearAttentionBlock (attnfast.reference, the seed layer), attnfast.nn.GlobalContext vs timm's
GlobalContext, GlobalContextPool vs its formula. Three-way (float64 truth, eager in the same dtype): outputs and
every gradient (inputs and parameters); state dicts load both ways; under autocast the outputs come back in eager's
dtypes; bad inputs are ValueErrors."""
import pytest
import torch
import torch.nn.functional as F

from attnfast.nn.attention_pool import GlobalContext, GlobalContextPool, LinearAttentionBlock
from attnfast.reference.attention_pool import LinearAttentionBlock as RefLinear
from attnfast.testing import BASE_ATOL, assert_close_3way

BACKENDS = ["triton_backend", "torch_backend"]


def _run(module, inputs, upstream, amp=None):
    module.zero_grad(set_to_none=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast(leaves[0].device.type, dtype=amp, enabled=amp is not None):
        outs = module(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, upstream)])
    return [o.detach() for o in outs] + [t.grad for t in leaves] + [p.grad for _, p in module.named_parameters()]


def _three_way(ref, fused, shapes, dtype, device, amp=None, factor=2.0):
    """ref (float64 copy as truth, a copy in ``dtype`` as eager) vs fused with the same weights."""
    import copy

    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())  # and back: the same keys and shapes
    eager = copy.deepcopy(ref).to(device=device, dtype=dtype)
    ref64 = copy.deepcopy(ref).to(device=device, dtype=torch.float64)
    fused = fused.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).double().to(device) for s in shapes]
    with torch.no_grad():
        outs = ref64(*inputs)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device)
                for o in (outs if isinstance(outs, tuple) else (outs,))]
    want = _run(ref64, inputs, upstream)
    got_eager = _run(eager, [t.to(dtype) for t in inputs], upstream, amp)
    got = _run(fused, [t.to(dtype) for t in inputs], upstream, amp)
    for o, e in zip(got, got_eager):
        assert o.dtype == e.dtype and o.shape == e.shape
    assert_close_3way(got, want, got_eager, factor=factor, atol=BASE_ATOL[amp or dtype],
                      name=f"{type(fused).__name__} {dtype} amp={amp}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize_attn", [True, False])
@pytest.mark.parametrize("g_shape", ["pooled", "map"])
def test_linear_attention_block(request, backend, normalize_attn, g_shape, device):
    request.getfixturevalue(backend)
    g = (2, 12, 1, 1) if g_shape == "pooled" else (2, 12, 5, 7)
    _three_way(RefLinear(12, normalize_attn), LinearAttentionBlock(12, normalize_attn), [(2, 12, 5, 7), g],
               torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"fuse_add": True, "fuse_scale": False}, {"fuse_add": True}],
                         ids=["scale", "add", "add+scale"])
def test_timm_global_context(request, backend, options, device):
    timm_gc = pytest.importorskip("timm.layers.global_context")
    request.getfixturevalue(backend)
    _three_way(timm_gc.GlobalContext(16, **options), GlobalContext(16, **options), [(2, 16, 5, 6)], torch.float32,
               device)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["amp-bf16", "amp-fp16"])
def test_autocast_dtypes_and_values(torch_backend, amp):
    timm_gc = pytest.importorskip("timm.layers.global_context")
    for ref, fused, shapes in ((RefLinear(8), LinearAttentionBlock(8), [(2, 8, 5, 6), (2, 8, 1, 1)]),
                               (RefLinear(8, False), LinearAttentionBlock(8, False), [(2, 8, 5, 6), (2, 8, 1, 1)]),
                               (timm_gc.GlobalContext(16), GlobalContext(16), [(2, 16, 5, 6)])):
        _three_way(ref, fused, shapes, torch.float32, "cpu", amp=amp, factor=3.0)


def test_global_context_pool_formula(torch_backend):
    pool = GlobalContextPool(6)
    x = torch.randn(2, 6, 4, 5)
    attn = F.softmax(pool.conv_attn(x).flatten(1), 1)
    want = torch.einsum("bchw,bhw->bc", x, attn.view(2, 4, 5))[:, :, None, None]
    torch.testing.assert_close(pool(x), want)


def test_global_context_without_timm_children_uses_given_modules():
    conv = torch.nn.Conv2d(4, 1, 1)
    mlp = torch.nn.Conv2d(4, 4, 1)
    gc = GlobalContext.from_modules(conv, None, mlp, torch.nn.Sigmoid())
    assert gc.conv_attn is conv and gc.mlp_scale is mlp and gc.mlp_add is None
    x = torch.randn(2, 4, 3, 3)
    context = torch.einsum("bchw,bhw->bc", x, F.softmax(conv(x).flatten(1), 1).view(2, 3, 3))[:, :, None, None]
    torch.testing.assert_close(gc(x), x * torch.sigmoid(mlp(context)))


def test_bad_inputs():
    block = LinearAttentionBlock(8)
    with pytest.raises(ValueError, match="l must have 8 channels .the weight's in_channels.; got 6"):
        block(torch.randn(2, 6, 4, 4), torch.randn(2, 6, 1, 1))
    with pytest.raises(ValueError, match=r"g must be the global feature, \(2, 8, 1, 1\)"):
        block(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2))
    with pytest.raises(ValueError, match="float64.*float32|float32.*float64"):
        block(torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 8, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be a 4-D tensor"):
        GlobalContextPool(8)(torch.randn(2, 8, 4))
