"""swap replaces timm's CbamModule / LightCbamModule (inside a timm ResNet) and attnfast's reference CBAM with
the fused modules: same outputs, gradients and optimizer steps as the unswapped model, same Parameters."""
import copy

import pytest
import torch
import torch.nn as nn

import attnfast
from attnfast.nn.cbam import CBAM, LightCBAM
from attnfast.reference import cbam as ref_cbam

timm = pytest.importorskip("timm")
from timm.layers import cbam as timm_cbam  # noqa: E402


def _step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(x)
    loss = nn.functional.cross_entropy(out, target) if out.dim() == 2 else (out * target).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return out.detach(), grads


def _assert_same(model, swapped_model, x, target, atol=1e-5):
    ref_out, ref_grads = _step(model, x, target)
    out, grads = _step(swapped_model, x, target)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=atol, msg=n)
    for (n, p), (_, q) in zip(model.named_parameters(), swapped_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=atol, msg=f"after one step: {n}")
    for (n, b), (_, c) in zip(model.named_buffers(), swapped_model.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=atol, msg=f"buffer {n}")


@pytest.mark.parametrize("attn, fused_cls, timm_cls", [("cbam", CBAM, timm_cbam.CbamModule),
                                                       ("lcbam", LightCBAM, timm_cbam.LightCbamModule)])
def test_timm_resnet_cbam_swapped(attn, fused_cls, timm_cls):
    model = timm.create_model("resnet18", block_args=dict(attn_layer=attn), num_classes=3, pretrained=False)
    n_blocks = sum(isinstance(m, timm_cls) for m in model.modules())
    assert n_blocks == 8
    oracle = copy.deepcopy(model)
    keys = list(model.state_dict())
    params_before = {id(p) for p in model.parameters()}
    result = attnfast.swap(model)
    assert not result.skipped, result.summary()
    assert len(result) == n_blocks and all(r.new_type.endswith(fused_cls.__name__) for r in result)
    assert sum(isinstance(m, fused_cls) for m in model.modules()) == n_blocks
    assert not any(isinstance(m, timm_cls) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert {id(p) for p in model.parameters()} == params_before  # the same Parameter objects
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    _assert_same(oracle, model, x, target)
    model.eval(), oracle.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), rtol=1e-4, atol=1e-5)
    attnfast.unswap(model)
    assert sum(isinstance(m, timm_cls) for m in model.modules()) == n_blocks


def test_optimizer_built_before_swap_trains_the_swapped_cbam():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), timm_cbam.CbamModule(32), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    oracle = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attnfast.swap(model)
    assert isinstance(model[1], CBAM)
    x, target = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 1, 0])
    for m in (model, oracle):
        o = torch.optim.Adam(m.parameters(), lr=1e-2) if m is oracle else opt
        for _ in range(2):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), target).backward()
            o.step()
    for (n, p), (_, q) in zip(oracle.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("ref_cls, fused_cls", [(ref_cbam.CBAM, CBAM), (ref_cbam.LightCBAM, LightCBAM)])
def test_reference_cbam_swapped(ref_cls, fused_cls):
    model = nn.Sequential(ref_cls(24, rd_channels=6, spatial_kernel_size=5, mlp_bias=True))
    oracle = copy.deepcopy(model)
    result = attnfast.swap(model)
    assert type(model[0]) is fused_cls and len(result) == 1
    x = torch.randn(2, 24, 7, 5)
    _assert_same(oracle, model, x, torch.randn(2, 24, 7, 5))


@pytest.mark.parametrize("make, reason", [
    (lambda: timm_cbam.CbamModule(32, act_layer=nn.SiLU), "ReLU"),
    (lambda: timm_cbam.CbamModule(64, act_layer=nn.LeakyReLU), "ReLU"),
    (lambda: timm_cbam.LightCbamModule(64, act_layer=nn.ReLU6), "ReLU"),
    (lambda: timm_cbam.CbamModule(32, gate_layer="hard_sigmoid"), "sigmoid"),
    (lambda: _bn_eps(timm_cbam.CbamModule(32)), "eps"),
])
def test_cbam_look_alikes_are_left_alone(make, reason):
    model = nn.Sequential(make())
    before = type(model[0])
    with pytest.warns(attnfast.swap.SwapWarning):
        result = attnfast.swap(model)
    assert type(model[0]) is before and not result
    assert len(result.skipped) == 1 and reason in result.skipped[0].reason, result.summary()


def _bn_eps(m):
    m.spatial.conv.bn.eps = 1e-3
    return m


@pytest.mark.parametrize("make", [lambda: timm_cbam.CbamModule(16), lambda: ref_cbam.CBAM(16)], ids=["timm", "reference"])
def test_frozen_batchnorm_inside_cbam(make):
    """Fine-tuning with frozen BatchNorms (model.train(), every BN .eval()): the fused CBAM's BN keeps using
    and keeping its running statistics, like the original's."""
    model = nn.Sequential(make())
    bn = model[0].spatial.conv.bn
    with torch.no_grad():
        bn.running_mean.fill_(0.7)
        bn.running_var.fill_(3.0)
    model.train()
    bn.eval()
    oracle = copy.deepcopy(model)
    result = attnfast.swap(model)
    assert len(result) == 1 and not result.skipped
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(model(x), oracle(x), rtol=1e-4, atol=1e-5)
    assert model[0].spatial.conv.bn.running_mean.item() == pytest.approx(0.7)  # frozen: unchanged
    model[0].spatial.conv.bn.train()  # unfreezing after the swap follows the flag too
    oracle[0].spatial.conv.bn.train()
    torch.testing.assert_close(model(x), oracle(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0].spatial.conv.bn.running_mean, oracle[0].spatial.conv.bn.running_mean)


def test_unswap_gives_timm_its_own_children_back():
    m = timm_cbam.CbamModule(16)
    channel, spatial, act, gate = m.channel, m.spatial, m.channel.act, m.spatial.gate
    model = nn.Sequential(m)
    attnfast.swap(model)
    assert isinstance(model[0], CBAM)
    model[0].eval()
    attnfast.unswap(model)
    assert model[0] is m and m.channel is channel and m.spatial is spatial
    assert m.channel.act is act and m.spatial.gate is gate
    assert not m.training and not m.spatial.conv.bn.training  # modes set on the fused module come back
