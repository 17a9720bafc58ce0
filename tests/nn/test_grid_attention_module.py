"""attnfast.nn.GridAttention as a drop-in: constructor, state dicts both ways, bad input, AttnVGG."""
import pytest
import torch

import attnfast
from attnfast.models.attnvgg import AttnVGG
from attnfast.nn.grid_attention import GridAttention
from attnfast.reference.grid_attention import GridAttention as RefGridAttention


def test_public_name():
    assert attnfast.GridAttention is GridAttention


def test_same_constructor_and_parameters():
    ref = RefGridAttention(16, 32, 8, 4, normalize_attn=False)
    fused = GridAttention(16, 32, 8, 4, normalize_attn=False)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert (fused.up_factor, fused.normalize_attn) == (4, False)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_load_state_dict_both_ways(request, backend, device):
    request.getfixturevalue(backend)
    torch.manual_seed(0)
    ref = RefGridAttention(8, 16, 16, 2).to(device)
    fused = GridAttention(8, 16, 16, 2).to(device)
    fused.load_state_dict(ref.state_dict(), strict=True)
    l, g = torch.randn(2, 8, 6, 6, device=device), torch.randn(2, 16, 3, 3, device=device)
    for x, y in zip(fused(l, g), ref(l, g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for p in fused.parameters():
            p.mul_(-1.5)
    back = RefGridAttention(8, 16, 16, 2).to(device)
    back.load_state_dict(fused.state_dict(), strict=True)
    for x, y in zip(back(l, g), fused(l, g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_bad_input(request, backend, device):
    request.getfixturevalue(backend)
    m = GridAttention(8, 16, 16, 2).to(device)
    randn = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    l, g = randn(2, 8, 6, 6), randn(2, 16, 3, 3)
    cases = [
        ((l[0], g), "4-D"),  # rank
        ((l, g[0]), "4-D"),
        ((randn(2, 5, 6, 6), g), "8 channels"),  # channel counts
        ((l, randn(2, 12, 3, 3)), "16 channels"),
        ((l, randn(2, 16, 4, 3)), "up_factor=2"),  # size mismatch with up_factor
        ((randn(2, 8, 7, 6), g), "up_factor=2"),
        ((l, randn(3, 16, 3, 3)), "batch size"),
        ((l.double(), g), "dtype"),  # mixed dtypes
        ((l, g.half()), "dtype"),
        ((l, g.to("meta")), "device"),  # mixed devices
        ((l.long(), g), "floating"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            m(*args)


def test_bad_constructor():
    with pytest.raises(ValueError, match="up_factor"):
        GridAttention(8, 16, 16, 0)


@pytest.mark.parametrize("normalize", [True, False])
def test_attnvgg_fused_matches_reference(triton_backend, normalize, device):
    """Same weights, small input: logits and both attention maps agree; so do the attention grads."""
    torch.manual_seed(0)
    ref = AttnVGG(num_classes=3, normalize_attn=normalize, attention="reference", width_mult=0.125).eval()
    fused = AttnVGG(num_classes=3, normalize_attn=normalize, attention="fused", width_mult=0.125).eval()
    assert isinstance(fused.attn1, GridAttention) and not isinstance(ref.attn1, GridAttention)
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref, fused = ref.to(device), fused.to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    out_ref = ref(x)
    out = fused(x)
    for o, r in zip(out, out_ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
    out[0].square().sum().backward()
    out_ref[0].square().sum().backward()
    for name in ("attn1.W_l.weight", "attn1.W_g.weight", "attn2.phi.weight", "attn2.phi.bias"):
        torch.testing.assert_close(fused.get_parameter(name).grad, ref.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-5)
