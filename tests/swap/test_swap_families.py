"""The families the existing fused ops express, on layers written as public projects write them
(tests/swap/public_layers.py; timm's from the installed package).

Each model is swapped with an optimizer built before the swap and trained two steps next to an unswapped deep
copy (swap_checks.check_swap_trains_like_oracle): outputs, input and parameter gradients, parameters after the
steps and buffers (BatchNorm statistics, spectral norm's power-iteration vectors) must agree. Then unswap gives
back the original objects, dry_run changes nothing and strict raises on a layer that cannot be swapped.
"""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import public_layers as P
from attnfast.nn.cbam_authors import AuthorsCBAM
from attnfast.nn.projected_self_attention import ProjectedSelfAttention2d
from attnfast.swap import SwapWarning, swap, unswap
from seed_modules import SelfAttention
from seed_modules import randomize
from swap_checks import check_swap_trains_like_oracle

timm_layers = pytest.importorskip("timm.layers")


class Net(nn.Module):
    """conv -> BatchNorm -> the attention layer -> a conv head: the layer sits inside a model, in train mode."""

    def __init__(self, layer, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.attn = layer
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        out = self.attn(F.relu(self.bn(self.stem(x))))
        out, *rest = out if isinstance(out, tuple) else (out,)
        return (self.head(out), *rest)


def _sagan(wrap):
    layer = SelfAttention(16, "relu")
    for name in ("query_conv", "key_conv", "value_conv"):
        setattr(layer, name, wrap(getattr(layer, name)))
    return layer


def _bias_free_sagan():
    layer = SelfAttention(16, "relu")
    layer.query_conv = nn.Conv2d(16, 2, 1, bias=False)
    layer.key_conv = nn.Conv2d(16, 2, 1, bias=False)
    return layer


CASES = {
    # BigGAN-PyTorch's Attention with its own SNConv2d (power iteration buffers u0/sv0, updated in train mode)
    "biggan_snconv": lambda: P.Attention(16),
    "biggan_plain_convs": lambda: P.Attention(16, which_conv=nn.Conv2d),
    "biggan_parametrized": lambda: P.Attention(
        16, which_conv=lambda *a, **k: nn.utils.parametrizations.spectral_norm(nn.Conv2d(*a, **k))),
    # SAGAN with spectral norm: the hook (weight_orig, weight_u/v) and the parametrization
    "sagan_spectral_norm_hook": lambda: _sagan(nn.utils.spectral_norm),
    "sagan_parametrized": lambda: _sagan(nn.utils.parametrizations.spectral_norm),
    "sagan_bias_free": _bias_free_sagan,
    # timm's NonLocalAttn (its BatchNorm trains with the model)
    "timm_nonlocal": lambda: timm_layers.NonLocalAttn(16, rd_channels=8),
    # the CBAM authors' code (BatchNorm momentum 0.01)
    "cbam_authors": lambda: P.CBAM(16, reduction_ratio=4),
}
EXPECTED = {name: ProjectedSelfAttention2d for name in CASES}
EXPECTED["cbam_authors"] = AuthorsCBAM
DROPPED = {"sagan_spectral_norm_hook": (1,), "sagan_parametrized": (1,), "sagan_bias_free": (1,)}


def _model(case):
    torch.manual_seed(0)
    net = Net(CASES[case]())
    randomize(net.attn, scale=0.3)
    return net


@pytest.mark.parametrize("case", list(CASES))
def test_family_trains_like_the_original(case):
    model = _model(case).train()
    original = model.attn
    params = {n: p for n, p in original.named_parameters()}
    result = check_swap_trains_like_oracle(model, (torch.randn(2, 3, 6, 8),),
                                           [("attn", EXPECTED[case].__name__)], dropped=DROPPED.get(case, ()))
    assert type(model.attn) is EXPECTED[case]
    assert {n: p for n, p in model.attn.named_parameters()} == params  # the same Parameter objects, same names
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    back = unswap(model)
    assert [r.name for r in back] == ["attn"] and model.attn is original
    for k, v in model.state_dict().items():  # the training happened on the original's own tensors
        assert torch.equal(v, trained[k]), k
    assert result[0].family in ("biggan", "sagan_projected", "timm_nonlocal", "cbam_authors")


def test_projected_modules_call_the_users_own_projections():
    """Spectral norm keeps running: the original's power iteration vectors move in train mode, not in eval."""
    model = _model("biggan_snconv")
    swap(model)
    u = model.attn.theta.u0.clone()
    model.eval()
    model(torch.randn(2, 3, 6, 8))
    assert torch.equal(model.attn.theta.u0, u)
    model.train()
    model(torch.randn(2, 3, 6, 8))
    assert not torch.equal(model.attn.theta.u0, u)
    calls = []
    model.attn.g.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    model(torch.randn(1, 3, 6, 8))
    assert calls == [(1, 8, 6, 8)]  # the user's hook on a projection still runs


def test_timm_nonlocal_scale_is_read_at_each_call():
    model = _model("timm_nonlocal").eval()
    result = swap(model)
    assert dict(result[0].options) == {"scale": pytest.approx(16 ** -0.5)}
    assert any("reset_parameters" in n for n in result[0].notes)
    oracle = unswap(copy.deepcopy(model)).model
    x = torch.randn(2, 3, 6, 8)
    for layer in (model.attn, oracle.attn):
        layer.scale = 0.7  # a user changing timm's attribute after the swap: both follow
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], oracle(x)[0], atol=1e-5, rtol=1e-4)


def test_timm_resnet_with_nonlocal_blocks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", block_args=dict(attn_layer="nl"), num_classes=3, pretrained=False)
    n = sum(isinstance(m, timm_layers.NonLocalAttn) for m in model.modules())
    randomize(model, scale=0.1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    result = swap(model)
    assert len(result) == n > 0 and not result.skipped
    assert {r.family for r in result} == {"timm_nonlocal"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-3)


def test_cbam_authors_layout_adapters():
    """Linear weights are read through a view, the spatial conv's [max, mean] channels through a flip, the
    BatchNorm is the user's own (momentum 0.01): one forward in train mode moves its running mean by 1%."""
    model = _model("cbam_authors")
    bn = model.attn.SpatialGate.spatial.bn
    result = swap(model)
    assert dict(result[0].options) == {"max_first": True}
    assert any("ties" in n for n in result[0].notes)
    assert model.attn.SpatialGate.spatial.bn is bn and bn.momentum == 0.01
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 6, 8))
    assert bn.num_batches_tracked.item() == 1
    assert 0 < (bn.running_mean - before).abs().item() < 0.05
    model.attn.no_spatial = True  # honoured, as the original's forward reads it
    oracle = unswap(copy.deepcopy(model)).model
    x = torch.randn(2, 3, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], oracle(x)[0])


def test_cbam_authors_ties_are_the_documented_difference():
    """Where a channel's maximum is attained twice, the fused op splits its gradient (values unchanged)."""
    torch.manual_seed(0)
    layer = randomize(P.CBAM(16, reduction_ratio=4)).eval()
    fused = swap(copy.deepcopy(layer)).model
    x = torch.randn(1, 16, 4, 4)
    x[0, 3] = 1.5  # every pixel of channel 3 ties for its maximum
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), fused(xb)
    torch.testing.assert_close(yb, ya)
    ya.sum().backward()
    yb.sum().backward()
    others = [c for c in range(16) if c != 3]
    torch.testing.assert_close(xb.grad[:, others], xa.grad[:, others], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(xb.grad[:, 3], xa.grad[:, 3], atol=1e-5)  # the max-pool gradient lands elsewhere


@pytest.mark.parametrize("case", ["biggan_snconv", "sagan_parametrized", "cbam_authors"])
def test_family_on_the_triton_path(case, triton_backend):
    """The fused ops' Triton kernels (the interpreter on CPU), tiny sizes, forward and backward."""
    model = _model(case).eval()
    oracle = copy.deepcopy(model)
    assert len(swap(model)) == 1
    x = torch.randn(2, 3, 4, 4)
    out, ref = model(x)[0], oracle(x)[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_dry_run_and_strict():
    model = nn.ModuleDict({"ok": _model("biggan_snconv").attn, "bad": _model("biggan_plain_convs").attn})
    model["bad"].ch = 8  # the original's forward reshapes with ch: it no longer matches the convolutions
    ids = [id(m) for m in model.modules()]
    with pytest.warns(SwapWarning, match=r"bad \(public_layers.Attention\): its ch attribute is 8"):
        planned = swap(model, dry_run=True)
    assert [(r.name, r.family) for r in planned] == [("ok", "biggan")]
    assert [id(m) for m in model.modules()] == ids
    with pytest.raises(ValueError, match=r"(?s)strict=True.*bad \(public_layers.Attention\)"):
        swap(model, strict=True)
    assert [id(m) for m in model.modules()] == ids


@pytest.mark.parametrize("make, reason", [
    (lambda: P.CBAM(16, reduction_ratio=4, pool_types=["avg"]), "pool_types"),
    (lambda: P.CBAM(16, reduction_ratio=4, pool_types=["avg", "lse"]), "pool_types"),
    (lambda: _relu_spatial(P.CBAM(16, reduction_ratio=4)), "ReLU"),
])
def test_cbam_authors_variants_are_refused(make, reason):
    with pytest.warns(SwapWarning):
        result = swap(nn.Sequential(make()))
    assert not result and len(result.skipped) == 1
    assert result.skipped[0].family == "cbam_authors" and reason in result.skipped[0].reason


def _relu_spatial(m):
    m.SpatialGate.spatial.relu = nn.ReLU()
    return m


def test_cbam_authors_without_spatial_gate_is_out_of_scope():
    with pytest.warns(SwapWarning, match="out of scope"):
        result = swap(nn.Sequential(P.CBAM(16, reduction_ratio=4, no_spatial=True)))
    assert [(s.name, s.family, s.status) for s in result.skipped] == [("0", "cbam_authors", "out of scope")]


def test_partial_functools_which_conv():
    """BigGAN configures its convs with functools.partial(SNConv2d, num_svs=1, num_itrs=1, eps=1e-6)."""
    layer = P.Attention(16, which_conv=functools.partial(P.SNConv2d, num_svs=1, num_itrs=1, eps=1e-6))
    randomize(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)
        result = swap(nn.Sequential(layer))
    assert [r.family for r in result] == ["biggan"]
