"""SelfAttention2d as a drop-in for the reference SAGAN layer, its variants and attention_maps."""
import pytest
import torch
import torch.nn.functional as F

from attnfast.nn.self_attention import SelfAttention2d, attention_maps
from attnfast.reference.self_attention import SelfAttention
from attnfast.testing import assert_close_3way

BACKENDS = ["triton_backend", "torch_backend"]


def _pair(c=16, gamma=0.8):
    ref = SelfAttention(c)
    with torch.no_grad():
        ref.gamma.fill_(gamma)
    fused = SelfAttention2d(c)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_state_dict_both_ways_and_names():
    ref, fused = _pair()
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert sorted(ref.state_dict()) == ["gamma", "key_conv.bias", "key_conv.weight", "query_conv.bias",
                                        "query_conv.weight", "value_conv.bias", "value_conv.weight"]
    other = SelfAttention(16)
    other.load_state_dict(fused.state_dict())
    for (n, a), (_, b) in zip(sorted(other.state_dict().items()), sorted(fused.state_dict().items())):
        assert torch.equal(a, b), n
    assert SelfAttention2d(16).gamma.item() == 0.0  # starts at 0 like the seed


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_unpacking_and_output(request, backend):
    request.getfixturevalue(backend)
    ref, fused = _pair()
    x = torch.randn(2, 16, 6, 5)
    out, attn = fused(x)  # the user's `out, attn = layer(x)` keeps working
    assert attn is None
    out_ref, _ = ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    plain = SelfAttention2d(16, tuple_output=False)
    plain.load_state_dict(ref.state_dict())
    torch.testing.assert_close(plain(x), out_ref, rtol=1e-5, atol=1e-5)


def test_attention_maps_match_reference_rows():
    ref, fused = _pair(c=24)
    x = torch.randn(2, 24, 5, 7)
    _, attn = ref(x)  # (B, N, N)
    queries = [0, (2, 3), 34]
    flat = [0, 2 * 7 + 3, 34]
    for layer in (fused, ref):  # works on the reference layer too (same parameter names)
        maps = attention_maps(layer, x, queries)
        assert maps.shape == (2, 3, 5, 7)
        torch.testing.assert_close(maps.flatten(2), attn[:, flat], rtol=1e-5, atol=1e-6)
    maps_t = fused.attention_maps(x, torch.tensor([[2, 3], [4, 6]]))
    torch.testing.assert_close(maps_t.flatten(2), attn[:, [17, 34]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("queries, match", [([], "non-empty"), ([35], r"\[0, 35\)"), ([(5, 0)], "out of range"),
                                            (["a"], "int flat index"), (torch.tensor([0.5]), "integer")])
def test_attention_maps_bad_queries(queries, match):
    _, fused = _pair()
    with pytest.raises(ValueError, match=match):
        attention_maps(fused, torch.randn(1, 16, 5, 7), queries)


def _variant64(layer, x):
    """Float64 reference of the pooled / multi-head / value_dim variants, in plain PyTorch."""
    b, c, h, w = x.shape
    hd = layer.heads
    q = F.conv2d(x, layer.query_conv.weight, layer.query_conv.bias)
    k = F.conv2d(x, layer.key_conv.weight, layer.key_conv.bias)
    v = F.conv2d(x, layer.value_conv.weight, layer.value_conv.bias)
    if layer.pool:
        k, v = F.max_pool2d(k, 2, ceil_mode=True), F.max_pool2d(v, 2, ceil_mode=True)
    qh, kh, vh = q.reshape(b, hd, -1, h * w), k.flatten(2).reshape(b, hd, -1, k.shape[-2] * k.shape[-1]), None
    vh = v.reshape(b, hd, -1, kh.shape[-1])
    attn = torch.softmax(layer.scale * qh.transpose(-1, -2) @ kh, -1)  # (B, hd, N, NK)
    o = (vh @ attn.transpose(-1, -2)).reshape(b, -1, h, w)
    if layer.out_conv is not None:
        o = F.conv2d(o, layer.out_conv.weight, layer.out_conv.bias)
    return layer.gamma * o + x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(pool=True), dict(heads=2, scale=0.5), dict(value_dim=8, pool=True),
                                    dict(pool=True, heads=4, value_dim=12)], ids=str)
@pytest.mark.parametrize("hw", [(6, 10), (5, 7), (1, 1)], ids=str)
def test_variants_match_float64(request, backend, kwargs, hw):
    request.getfixturevalue(backend)
    c = 32
    layer64 = SelfAttention2d(c, **kwargs).double()
    with torch.no_grad():
        layer64.gamma.fill_(0.9)
    x = torch.randn(2, c, *hw, dtype=torch.float64)
    g = torch.randn(2, c, *hw, dtype=torch.float64)

    def run(fn, layer, dtype):
        layer.zero_grad(set_to_none=True)
        xx = x.detach().to(dtype).clone().requires_grad_()
        out = fn(layer, xx)
        out.backward(g.to(dtype))
        return [out.detach(), xx.grad] + [p.grad for _, p in sorted(layer.named_parameters())]

    ref = run(_variant64, layer64, torch.float64)
    layer32 = SelfAttention2d(c, **kwargs)
    layer32.load_state_dict(layer64.state_dict())
    eager = run(_variant64, layer32, torch.float32)
    out = run(lambda m, xx: m(xx)[0], layer32, torch.float32)
    assert_close_3way(out, ref, eager, name=f"variant {kwargs} {hw}", factor=4.0 if kwargs.get("pool") else 2.0)


def test_bad_input_and_options():
    layer = SelfAttention2d(16)
    with pytest.raises(ValueError, match="16 channels"):
        layer(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        layer(torch.ones(1, 16, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="heads"):
        SelfAttention2d(16, heads=3)
    with pytest.raises(ValueError, match="in_dim"):
        SelfAttention2d(0)
    with pytest.raises(ValueError, match="value_dim"):
        SelfAttention2d(16, value_dim=-2)


def test_channels_last_and_fp64(torch_backend):
    ref, fused = _pair()
    x = torch.randn(2, 16, 5, 6).to(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    ref64, fused64 = ref.double(), fused.double()
    x64 = x.double()
    torch.testing.assert_close(fused64(x64)[0], ref64(x64)[0], rtol=1e-12, atol=1e-12)
