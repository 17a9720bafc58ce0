"""attnfast.swap on users' real variants of the seeds' layers.

Every test builds a model, keeps a deep copy as the oracle (never swapped), builds an optimizer BEFORE swap
(the usual order in training scripts) and checks against the oracle: the outputs, the gradients of every
parameter (by name; state_dict keys must not change) and the parameters after optimizer steps.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnfast.nn import GridAttention as FusedGrid
from attnfast.nn import SelfAttention2d
from attnfast.swap import SwapWarning, swap, unswap
from seed_modules import AttentionBlock, GridAttentionBlock, ScaledSelfAttention, SelfAttention, SelfAttentionOutOnly
from seed_modules import randomize as _randomize
from swap_checks import _largest, _loss, check_swap_trains_like_oracle, close, type_tail


# --- users' models ---------------------------------------------------------------------------------
class SaganNet(nn.Module):
    """The forum's usage: ``out, attn = self.attn(x)``."""

    def __init__(self, layer=SelfAttention):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.attn = layer(16, "relu")
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        out, attention = self.attn(F.relu(self.bn(self.conv(x))))
        return self.head(out.mean((2, 3))), attention


class OutOnlyNet(nn.Module):
    """A model that returns the layer's output directly (and feeds it to the next conv)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = SelfAttentionOutOnly(16, "relu")
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.attn(F.relu(self.conv(x))))


class LtpaNet(nn.Module):
    """Learn to Pay Attention's AttnVGG head: (logits, c1, c2) with the blocks returning their logits ``c``."""

    def __init__(self, normalize_attn):
        super().__init__()
        self.f3 = nn.Conv2d(3, 8, 3, padding=1)
        self.f4 = nn.Conv2d(8, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1)
        self.attn1 = GridAttentionBlock(8, 16, 8, 4, normalize_attn=normalize_attn)
        self.attn2 = GridAttentionBlock(16, 16, 8, 2, normalize_attn=normalize_attn)
        self.cls = nn.Linear(24, 3)

    def forward(self, x):
        l1 = F.relu(self.f3(x))
        l2 = F.max_pool2d(F.relu(self.f4(l1)), 2)
        g = F.max_pool2d(F.relu(self.g(l2)), 2)
        c1, g1 = self.attn1(l1, g)
        c2, g2 = self.attn2(l2, g)
        return self.cls(torch.cat([g1, g2], 1)), c1, c2


class MySelfAttention(SelfAttention):
    """A user subclass with its own forward: keeps out only, drops the attention."""

    def forward(self, x):
        out, _ = super().forward(x)
        return out


class GatedSelfAttention(SelfAttention):
    """A user subclass whose forward changes the maths: no fused configuration can express it."""

    def forward(self, x):
        out, attention = super().forward(x)
        return torch.tanh(out), attention


# --- the seeds' layers and the users' variants ------------------------------------------------------
@pytest.mark.parametrize("layer", [SelfAttention, ScaledSelfAttention])
def test_sagan_layer_returning_attention(layer):
    model = SaganNet(layer)
    _randomize(model.attn)
    result = check_swap_trains_like_oracle(model, (torch.randn(2, 3, 6, 5),), [("attn", "SelfAttention2d")],
                                           dropped=(1,))
    assert isinstance(model.attn, SelfAttention2d) and model.attn.tuple_output is True
    expected_scale = 1.0 if layer is SelfAttention else 2 ** -0.5  # in_dim 16 -> d = 2
    assert model.attn.scale == pytest.approx(expected_scale)
    assert dict(result[0].options)["scale"] == pytest.approx(expected_scale)
    assert any("attention_maps" in n for n in result[0].notes)


def test_scaled_lookalike_is_really_different():
    """The oracle above can fail: the unscaled fused layer is off for the scaled variant."""
    layer = _randomize(ScaledSelfAttention(16, None))
    plain = SelfAttention2d(16)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 6, 5)
    with torch.no_grad():
        assert (plain(x)[0] - layer(x)[0]).abs().max() > 1e-2


def test_layer_returning_only_out_stays_a_tensor():
    model = _randomize(OutOnlyNet())
    check_swap_trains_like_oracle(model, (torch.randn(2, 3, 8, 8),), [("attn", "SelfAttention2d")])
    assert model.attn.tuple_output is False
    assert isinstance(model(torch.randn(1, 3, 8, 8)), torch.Tensor)


def test_sequential_use():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), MySelfAttention(16, None), nn.Conv2d(16, 2, 1),
                                     nn.Flatten()))
    check_swap_trains_like_oracle(model, (torch.randn(2, 3, 4, 4),), [("2", "SelfAttention2d")])
    assert isinstance(model[2], SelfAttention2d) and model[2].tuple_output is False


def test_subclass_with_different_maths_is_left_alone_and_reported():
    model = SaganNet(GatedSelfAttention)
    _randomize(model.attn)
    before = [id(p) for p in model.parameters()]
    with pytest.warns(SwapWarning) as record:
        result = swap(model)
    assert list(result) == [] and type(model.attn) is GatedSelfAttention
    assert [(s.name, type_tail(s.type)) for s in result.skipped] == [("attn", "GatedSelfAttention")]
    assert "no fused configuration computes the same" in result.skipped[0].reason
    assert len(record) == 1 and "attn (" in str(record[0].message) and "GatedSelfAttention" in str(record[0].message)
    assert [id(p) for p in model.parameters()] == before


@pytest.mark.parametrize("normalize_attn", [True, False])
def test_seed_attention_block(normalize_attn):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Conv2d(3, 8, 3, padding=1)
            self.attn = AttentionBlock(8, 8, 4, 2, normalize_attn=normalize_attn)

        def forward(self, x):
            l = F.relu(self.f(x))
            return self.attn(l, F.max_pool2d(l, 2))

    model = _randomize(Net())
    check_swap_trains_like_oracle(model, (torch.randn(2, 3, 8, 8),), [("attn", "GridAttention")])
    assert model.attn.return_logits is False


@pytest.mark.parametrize("normalize_attn", [True, False])
def test_ltpa_block_returning_logits(normalize_attn):
    model = _randomize(LtpaNet(normalize_attn))
    check_swap_trains_like_oracle(model, (torch.randn(2, 3, 16, 16),),
                                  [("attn1", "GridAttention"), ("attn2", "GridAttention")])
    assert model.attn1.return_logits is True and model.attn2.return_logits is True
    # returning a instead of c would be wholly different: the test above can fail
    l, g = torch.randn(2, 8, 16, 16), torch.randn(2, 16, 4, 4)
    as_a = FusedGrid(8, 16, 8, 4, normalize_attn)
    as_a.load_state_dict(model.attn1.state_dict())
    with torch.no_grad():
        c = model.attn1(l, g)[0]
        assert (as_a(l, g)[0] - c).abs().max() > 0.5 * c.abs().max()


def test_unswap_restores_the_original_objects_after_training():
    model = SaganNet(SelfAttention)
    _randomize(model.attn)
    original, gamma = model.attn, model.attn.gamma
    check_swap_trains_like_oracle(model, (torch.randn(2, 3, 4, 4),), [("attn", "SelfAttention2d")], dropped=(1,))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    back = unswap(model)
    assert [r.name for r in back] == ["attn"] and model.attn is original and model.attn.gamma is gamma
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    out, attention = model(torch.randn(2, 3, 4, 4))
    assert attention.shape == (2, 16, 16)


# --- wrappers: DDP and torch.compile ----------------------------------------------------------------
@pytest.fixture
def gloo_world():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("order", ["swap_then_wrap", "wrap_then_swap"])
def test_ddp_wrapped(gloo_world, order):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _randomize(OutOnlyNet())
    x = torch.randn(2, 3, 6, 6)
    oracle = copy.deepcopy(net)
    if order == "swap_then_wrap":
        assert [r.name for r in swap(net)] == ["attn"]
        model = DDP(net)
    else:
        model = DDP(net)
        opt_first = torch.optim.SGD(model.parameters(), lr=0.05)  # built before swap
        assert [r.name for r in swap(model)] == ["module.attn"]
    opt = opt_first if order == "wrap_then_swap" else torch.optim.SGD(model.parameters(), lr=0.05)
    opt_oracle = torch.optim.SGD(oracle.parameters(), lr=0.05)
    assert isinstance(model.module.attn, SelfAttention2d)
    for _ in range(2):
        out, ref = model(x), oracle(x)
        close(out, ref)
        _loss(out).backward()
        _loss(ref).backward()
        for (n, p), (_, q) in zip(model.module.named_parameters(), oracle.named_parameters()):
            close(p.grad, q.grad, msg=n, group=_largest(oracle))
        opt.step()
        opt_oracle.step()
        opt.zero_grad()
        opt_oracle.zero_grad()
    for (n, p), (_, q) in zip(model.module.named_parameters(), oracle.named_parameters()):
        close(p, q, msg=n)


def _ran_fused_grid(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any("attnfast::grid_attention" in e.name for e in prof.events())


@pytest.mark.parametrize("order", ["swap_then_compile", "compile_then_swap"])
def test_torch_compile(order):
    """Both orders work; swapping first avoids one recompilation (dynamo's guards see the new modules)."""
    net = _randomize(LtpaNet(True))
    x = torch.randn(2, 3, 16, 16)
    oracle = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    opt_oracle = torch.optim.SGD(oracle.parameters(), lr=0.05)
    if order == "swap_then_compile":
        assert [r.name for r in swap(net)] == ["attn1", "attn2"]
        compiled = torch.compile(net, backend="aot_eager")
    else:
        compiled = torch.compile(net, backend="aot_eager")
        _, fused_ran = _ran_fused_grid(lambda: compiled(x))  # compiled with the original modules
        assert not fused_ran
        assert [r.name for r in swap(compiled)] == ["_orig_mod.attn1", "_orig_mod.attn2"]
    assert isinstance(net.attn1, FusedGrid) and net.attn1.return_logits
    for _ in range(2):
        out, fused_ran = _ran_fused_grid(lambda: compiled(x))
        assert fused_ran, "the compiled model must run the fused op after swap"
        ref = oracle(x)
        for u, v in zip(out, ref):
            close(u, v)
        _loss(out).backward()
        _loss(ref).backward()
        for (n, p), (_, q) in zip(net.named_parameters(), oracle.named_parameters()):
            close(p.grad, q.grad, msg=n, group=_largest(oracle))
        opt.step()
        opt_oracle.step()
        opt.zero_grad()
        opt_oracle.zero_grad()
