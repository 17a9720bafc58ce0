"""What swap leaves alone and what it reports: probe side effects, Parameters, hooks, dry_run, strict, skips."""
import copy

import pytest
import torch
import torch.nn as nn

from attnfast.nn import GridAttention as FusedGrid
from attnfast.nn import SelfAttention2d
from attnfast.reference import ResidualAttentionModule as RefRAM
from attnfast.reference import SelfAttention as RefSelf
from attnfast.swap import SwapWarning, swap, unswap
from seed_modules import AttentionBlock, SelfAttention
from seed_modules import randomize as _randomize


class BlockWithBN(nn.Module):
    """A RAM in a model with its own BatchNorm; one BN child frozen in eval inside a training model."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.ram = RefRAM(8, encoder_depth=1)

    def forward(self, x):
        return self.ram(self.bn(x))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_probe_leaves_state_untouched():
    model = BlockWithBN().train()
    model.ram.trunk[0].bn1.eval()  # a user's frozen BN: its flag must survive the probe's train/eval runs
    with torch.no_grad():
        model(torch.randn(4, 8, 8, 8))  # non-trivial running statistics
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    grads = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    before = _state(model)
    cpu_rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    result = swap(model, dry_run=True)
    assert [r.name for r in result] == ["ram"]
    result = swap(model)
    assert [r.name for r in result] == ["ram"] and type(model.ram).__name__ == "ResidualAttentionModule"
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.get_num_threads() == threads
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():  # BN running_mean/var and num_batches_tracked included
        assert torch.equal(after[k], v), k
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and torch.all(p.grad == 0.25), n
    assert {n: m.training for n, m in model.named_modules()} == flags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_leaves_cuda_rng_untouched_and_runs_on_the_device():
    model = _randomize(SelfAttention(16, None)).cuda()
    state = torch.cuda.get_rng_state()
    result = swap(model)
    assert [r.name for r in result] == [""] and isinstance(result.model, SelfAttention2d)
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_dry_run_changes_nothing_and_reports_the_same():
    model = nn.Sequential(_randomize(SelfAttention(16, None)), nn.ReLU())
    ids = [id(m) for m in model.modules()]
    before = _state(model)
    planned = swap(model, dry_run=True)
    assert [id(m) for m in model.modules()] == ids and type(model[0]) is SelfAttention
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert planned.dry_run and planned.model is model
    done = swap(model)
    assert [(r.name, r.new_type, r.options) for r in planned] == [(r.name, r.new_type, r.options) for r in done]
    assert "would replace 1 module(s)" in planned.summary() and "replaced 1 module(s)" in done.summary()


class SideEffect(AttentionBlock):
    """Keeps its last attention map for visualization: the fused module would not."""

    def forward(self, l, g):
        a, out = super().forward(l, g)
        self.last_map = a.detach()
        return a, out


class WithMethod(AttentionBlock):
    def attention_only(self, l, g):
        return self.forward(l, g)[0]


class Unscaled(nn.Module):
    """Right names and shapes, different maths (a sigmoid gate): the probe must catch it."""

    def __init__(self):
        super().__init__()
        self.query_conv = nn.Conv2d(16, 2, 1)
        self.key_conv = nn.Conv2d(16, 2, 1)
        self.value_conv = nn.Conv2d(16, 16, 1)
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x + self.gamma * torch.sigmoid(self.value_conv(x))


def _skip_model():
    model = nn.ModuleDict({
        "side": SideEffect(8, 8, 4, 2),
        "method": WithMethod(8, 8, 4, 2),
        "fake": Unscaled(),
        "sn": SelfAttention(16, None),
        "ok": AttentionBlock(8, 8, 4, 2),
    })
    model["sn"].query_conv = nn.utils.spectral_norm(model["sn"].query_conv)
    return _randomize(model)


def test_every_skip_is_reported_once_with_path_class_and_reason():
    model = _skip_model()
    with pytest.warns(SwapWarning) as record:
        result = swap(model)
    # a spectral-norm query_conv: the fused module calls the layer's own convs (sagan_projected)
    assert [(r.name, r.family) for r in result] == [("sn", "sagan_projected"), ("ok", "grid")]
    reasons = {s.name: (s.type.rsplit(".", 1)[-1], s.reason) for s in result.skipped}
    assert set(reasons) == {"side", "method", "fake"}
    assert reasons["side"][0] == "SideEffect" and "assigns attributes (last_map)" in reasons["side"][1]
    assert "attention_only" in reasons["method"][1]
    assert "no fused configuration computes the same" in reasons["fake"][1]
    assert len([w for w in record if w.category is SwapWarning]) == 1
    message = str(record[0].message)
    for name, (cls, reason) in reasons.items():
        assert f"{name} (" in message and cls in message and reason in message
    assert type(model["side"]) is SideEffect and not hasattr(model["side"], "last_map")  # probe left no trace


def test_strict_raises_and_changes_nothing():
    model = _skip_model()
    before = [type(m) for m in model.values()]
    with pytest.raises(ValueError, match=r"(?s)strict=True.*side \(.*SideEffect\).*fake \("):
        swap(model, strict=True)
    assert [type(m) for m in model.values()] == before  # "ok" was not swapped either


def test_hooks_are_carried_over_or_the_module_skipped():
    seen = []
    block = _randomize(AttentionBlock(8, 8, 4, 2))
    handle = block.register_forward_hook(lambda m, i, o: seen.append(("fwd", type(m).__name__)))
    block.register_forward_pre_hook(lambda m, i: seen.append(("pre", type(m).__name__)))
    layer = _randomize(SelfAttention(16, None))
    layer.query_conv.register_forward_hook(lambda m, i, o: seen.append(("query", o.shape[1])))
    model = nn.ModuleDict({"grid": block, "sagan": layer})
    result = swap(model)
    assert seen and set(seen) == {("query", 2)}  # the probe runs the children's hooks, not the module's own
    assert {r.name: r.notes for r in result}["grid"] == ("carried over 1 forward hook(s), 1 forward pre hook(s)",)
    seen.clear()
    model["grid"](torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2))
    model["sagan"](torch.randn(1, 16, 4, 4))
    assert seen == [("pre", "GridAttention"), ("fwd", "GridAttention"), ("query", 2)]
    handle.remove()  # the user's handle still works on the fused module
    seen.clear()
    model["grid"](torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2))
    assert seen == [("pre", "GridAttention")]
    # a hook on a child the fused grid op never calls would silently stop: left alone
    other = AttentionBlock(8, 8, 4, 2)
    other.W_l.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(SwapWarning, match="W_l has hooks"):
        assert list(swap(nn.Sequential(other))) == []


def test_state_dict_keys_and_loading_are_unchanged():
    model = nn.Sequential(_randomize(SelfAttention(16, None)), _randomize(AttentionBlock(16, 16, 4, 1)))
    saved = _state(model)
    swap(nn.ModuleList([model]))
    assert isinstance(model[0], SelfAttention2d) and isinstance(model[1], FusedGrid)
    assert list(model.state_dict()) == list(saved)
    model.load_state_dict(saved)  # a checkpoint written before swap loads after it


def test_float64_model():
    model = _randomize(SelfAttention(16, None)).double()
    result = swap(model)
    assert isinstance(result.model, SelfAttention2d) and result.model.gamma.dtype == torch.float64
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(result.model(x)[0], copy.deepcopy(model)(x)[0])


def test_fused_models_unswap_to_the_reference_and_back():
    from attnfast.models import AttnVGG

    model = AttnVGG(1, normalize_attn=True, attention="fused", width_mult=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    ids = [id(p) for p in model.parameters()]
    result = unswap(model)
    assert [r.name for r in result] == ["attn1", "attn2"] and type(model.attn1).__name__ == "GridAttention"
    assert type(model.attn1).__module__ == "attnfast.reference.grid_attention"
    assert [id(p) for p in model.parameters()] == ids
    with torch.no_grad():
        after = model(x)
    for u, v in zip(before, after):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
    assert unswap(model) == [] and type(model.attn1).__module__ == "attnfast.reference.grid_attention"  # idempotent
    assert [r.name for r in swap(model)] == ["attn1", "attn2"] and isinstance(model.attn1, FusedGrid)


def test_unswap_skips_fused_options_without_reference():
    layer = SelfAttention2d(16, pool=True)
    with pytest.warns(SwapWarning, match="pool, heads or value_dim"):
        result = unswap(nn.Sequential(layer))
    assert list(result) == [] and result.skipped[0].name == "0"


def test_reference_sagan_options_roundtrip():
    ref = _randomize(RefSelf(16, scale=0.5, tuple_output=False))
    result = swap(ref)
    assert dict(result[0].options) == {"tuple_output": False, "scale": 0.5}
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_unswap_takes_back_parameters_reassigned_after_swap():
    layer = _randomize(SelfAttention(16, None))
    model = nn.Sequential(layer)
    swap(model)
    new_gamma = nn.Parameter(torch.full((1,), 0.7))
    model[0].gamma = new_gamma
    conv = nn.Conv2d(16, 16, 1)
    model[0].value_conv = conv
    assert [r.name for r in unswap(model)] == ["0"]
    assert model[0] is layer and layer.gamma is new_gamma and layer.value_conv is conv
    assert dict(model.named_parameters())["0.value_conv.weight"] is layer.value_conv.weight
