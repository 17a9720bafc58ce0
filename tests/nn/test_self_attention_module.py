"""SelfAttention2d as a drop-in for the reference SAGAN layer, its variants and attention_maps."""
import pytest
import torch

from attnfast.nn.self_attention import SelfAttention2d, attention_maps
from attnfast.reference.self_attention import SelfAttention
from op_checks import check_sagan_variant

BACKENDS = ["triton_backend", "torch_backend"]


def _pair(c=16, gamma=0.8, device="cpu"):
    ref = SelfAttention(c)
    with torch.no_grad():
        ref.gamma.fill_(gamma)
    fused = SelfAttention2d(c)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device), fused.to(device)


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
def test_drop_in_unpacking_and_output(request, backend, device):
    request.getfixturevalue(backend)
    ref, fused = _pair(device=device)
    x = torch.randn(2, 16, 6, 5, device=device)
    out, attn = fused(x)  # the user's `out, attn = layer(x)` keeps working
    assert attn is None
    out_ref, _ = ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    plain = SelfAttention2d(16, tuple_output=False).to(device)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(pool=True), dict(heads=2, scale=0.5), dict(value_dim=8, pool=True),
                                    dict(pool=True, heads=4, value_dim=12)], ids=str)
@pytest.mark.parametrize("hw", [(6, 10), (5, 7), (1, 1)], ids=str)
def test_variants_match_float64(request, backend, kwargs, hw, device):
    request.getfixturevalue(backend)
    check_sagan_variant((2, 32, *hw), kwargs, torch.float32, device=device)


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
