"""attnfast.swap / attnfast.unswap on attnfast's reference modules and on users' copies of the seeds' classes."""
import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfast
from attnfast.reference import GridAttention as RefGrid
from attnfast.reference import ResidualAttentionModule as RefRAM
from attnfast.reference import SelfAttention as RefSelf
from attnfast.swap import Replacement, swap, unswap

HAS_FUSED_GRID = importlib.util.find_spec("attnfast.nn.grid_attention") is not None
HAS_FUSED_SELF = importlib.util.find_spec("attnfast.nn.self_attention") is not None
needs_grid = pytest.mark.skipif(not HAS_FUSED_GRID, reason="attnfast.nn.grid_attention not in this build yet")
needs_self = pytest.mark.skipif(not HAS_FUSED_SELF, reason="attnfast.nn.self_attention not in this build yet")


# The seeds' classes, verbatim (tests/seed_modules.py): a user's own code, swapped by structure.
from seed_modules import AttentionBlock  # noqa: E402
from seed_modules import SelfAttention as SeedSelfAttention  # noqa: E402


class Self_Attn(SeedSelfAttention):
    """The SAGAN repository's name for the forum's class: same structure, another class name."""


class UserGridNet(nn.Module):
    """A user's small AttnVGG-like net built on the tutorial's AttentionBlock."""

    def __init__(self, block=AttentionBlock, normalize_attn=True):
        super().__init__()
        self.f3 = nn.Conv2d(3, 16, 3, padding=1)
        self.f4 = nn.Conv2d(16, 32, 3, padding=1)
        self.f5 = nn.Conv2d(32, 32, 3, padding=1)
        self.attn1 = block(16, 32, 16, 4, normalize_attn=normalize_attn)
        self.heads = nn.ModuleList([block(32, 32, 16, 2, normalize_attn=normalize_attn)])
        self.cls = nn.Linear(16 + 32, 3)

    def forward(self, x):
        p3 = F.max_pool2d(F.relu(self.f3(x)), 2)
        p4 = F.max_pool2d(F.relu(self.f4(p3)), 2)
        p5 = F.max_pool2d(F.relu(self.f5(p4)), 2)
        a1, g1 = self.attn1(p3, p5)
        a2, g2 = self.heads[0](p4, p5)
        return self.cls(torch.cat([g1, g2], 1)), a1, a2


class UserSagan(nn.Module):
    def __init__(self, attn_cls=Self_Attn):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.attn = attn_cls(32, "relu")

    def forward(self, x):
        out, _ = self.attn(F.relu(self.conv(x)))
        return out


class LookAlike(nn.Module):
    """Same names as AttentionBlock but a 3x3 phi: not the seed's structure, must be left alone."""

    def __init__(self):
        super().__init__()
        self.up_factor, self.normalize_attn = 2, True
        self.W_l = nn.Conv2d(8, 4, 1, bias=False)
        self.W_g = nn.Conv2d(8, 4, 1, bias=False)
        self.phi = nn.Conv2d(4, 1, 3, padding=1)


class ExtraParam(AttentionBlock):
    """The seed's block plus a parameter the fused twin would silently drop: left alone."""

    def __init__(self):
        super().__init__(8, 8, 4, 2)
        self.scale = nn.Parameter(torch.ones(1))


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, (tuple, list)) else (out,)


def _assert_same_outputs(a, b, atol=1e-5, rtol=1e-4):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol)


# --- tests -------------------------------------------------------------------------------------------------
def test_public_names_work_whichever_import_came_first():
    # the package attribute is the function, whichever import came first
    from attnfast.models import ResidualAttentionNet

    model = ResidualAttentionNet(56, num_classes=2, width=8, attention="reference")
    assert [r.name for r in attnfast.swap(model)] == ["stage1.1", "stage2.1", "stage3.1"]
    assert [r.name for r in attnfast.unswap(model)] == ["stage1.1", "stage2.1", "stage3.1"]


def test_ran_reference_modules_swap_and_back():
    from attnfast.models import ResidualAttentionNet
    from attnfast.nn import ResidualAttentionModule as FusedRAM

    model = ResidualAttentionNet(56, num_classes=3, width=8, attention="reference").eval()
    x = torch.randn(2, 3, 64, 64)
    before = _outputs(model, x)
    replaced = swap(model)
    assert [r.name for r in replaced] == ["stage1.1", "stage2.1", "stage3.1"]
    assert all(isinstance(r, Replacement) and r.new_type.endswith("nn.residual_attention.ResidualAttentionModule")
               for r in replaced)
    assert all(type(m) is FusedRAM for m in (model.stage1[1], model.stage2[1], model.stage3[1]))
    _assert_same_outputs(before, _outputs(model, x))
    assert swap(model) == []  # idempotent: nothing left to replace
    back = unswap(model)
    assert [r.name for r in back] == ["stage1.1", "stage2.1", "stage3.1"]
    assert type(model.stage2[1]) is RefRAM
    _assert_same_outputs(before, _outputs(model, x))


class ScaledRAM(RefRAM):
    """A user's subclass with its own forward: the fused class would drop the override."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def test_user_subclass_of_the_reference_ram_is_left_alone():
    """The probe sees that the fused class would drop the subclass's forward: reported, left alone."""
    from attnfast.models import ResidualAttentionNet

    model = ResidualAttentionNet(56, num_classes=2, width=8, attention="reference").eval()
    model.stage2[1] = ScaledRAM(model.stage2[1].channels, encoder_depth=2)
    x = torch.randn(1, 3, 64, 64)
    before = _outputs(model, x)
    with pytest.warns(attnfast.swap.SwapWarning, match=r"stage2\.1 \(.*ScaledRAM\)"):
        result = swap(model)
    assert [r.name for r in result] == ["stage1.1", "stage3.1"]
    assert [s.name for s in result.skipped] == ["stage2.1"] and "different maths" in result.skipped[0].reason
    assert type(model.stage2[1]) is ScaledRAM
    _assert_same_outputs(before, _outputs(model, x))
    assert [r.name for r in unswap(model)] == ["stage1.1", "stage3.1"]
    assert type(model.stage2[1]) is ScaledRAM and type(model.stage1[1]) is RefRAM


def test_inplace_false_leaves_the_original_alone():
    from attnfast.models import ResidualAttentionNet

    model = ResidualAttentionNet(56, num_classes=2, width=8, attention="reference")
    result = swap(model, inplace=False)
    assert len(result) == 3 and result.model is not model
    assert type(model.stage1[1]) is RefRAM
    assert type(result.model.stage1[1]) is not RefRAM


def test_structural_lookalikes_are_not_swapped():
    model = nn.Sequential(LookAlike(), ExtraParam(), nn.Conv2d(3, 3, 1))
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.warns(attnfast.swap.SwapWarning):
        result = swap(model)
    assert result == []
    assert [(s.name, s.reason) for s in result.skipped] == [
        ("0", "phi is not a plain 1x1 convolution (kernel (3, 3), stride (1, 1), padding (1, 1), dilation (1, 1), "
              "groups 1)"),
        ("1", "parameters/buffers differ from the fused module's: extra scale")]
    assert type(model[0]) is LookAlike and type(model[1]) is ExtraParam
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])


def test_swap_rejects_non_modules():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        swap("not a model")


@needs_grid
@pytest.mark.parametrize("normalize_attn", [True, False])
def test_user_attention_block_swapped_by_structure(normalize_attn):
    from attnfast.nn import GridAttention as FusedGrid

    model = _randomize(UserGridNet(normalize_attn=normalize_attn)).eval()
    x = torch.randn(2, 3, 32, 32)
    before = _outputs(model, x)
    replaced = swap(model)
    assert [(r.name, r.old_type.rsplit(".", 1)[-1]) for r in replaced] == [
        ("attn1", "AttentionBlock"), ("heads.0", "AttentionBlock")]
    assert isinstance(model.attn1, FusedGrid) and isinstance(model.heads[0], FusedGrid)
    assert model.attn1.up_factor == 4 and model.attn1.normalize_attn is normalize_attn
    _assert_same_outputs(before, _outputs(model, x))
    # unswap brings back the user's own class, with the current weights
    with torch.no_grad():
        model.attn1.phi.bias.add_(0.5)
    after_edit = _outputs(model, x)
    back = unswap(model)
    assert len(back) == 2 and type(model.attn1) is AttentionBlock and type(model.heads[0]) is AttentionBlock
    assert model.attn1.W_l.weight.device.type == "cpu"
    _assert_same_outputs(after_edit, _outputs(model, x))


@needs_grid
def test_attnvgg_reference_to_fused_and_back_keeps_training_state():
    from attnfast.models import AttnVGG

    model = AttnVGG(1, normalize_attn=True, attention="reference", width_mult=0.125)
    _randomize(model.attn1)
    _randomize(model.attn2)
    model.attn2.phi.weight.requires_grad_(False)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    before = _outputs(model, x)
    replaced = swap(model)
    assert [r.name for r in replaced] == ["attn1", "attn2"]
    assert not model.attn2.phi.weight.requires_grad and not model.attn1.training
    _assert_same_outputs(before, _outputs(model, x))
    # gradients flow through the swapped modules
    model.train()
    out = model(x)[0].sum()
    out.backward()
    assert model.attn1.W_l.weight.grad is not None
    assert [r.name for r in unswap(model)] == ["attn1", "attn2"]
    assert type(model.attn1) is RefGrid


@needs_grid
def test_shared_module_stays_shared():
    block = _randomize(AttentionBlock(8, 8, 4, 2))
    model = nn.ModuleDict({"a": block, "b": block})
    replaced = swap(model)
    assert sorted(r.name for r in replaced) == ["a", "b"]
    assert model["a"] is model["b"]


@needs_grid
def test_root_module_itself_is_swapped():
    block = _randomize(RefGrid(8, 8, 4, 2)).eval()
    result = swap(block)
    assert [r.name for r in result] == [""] and result.model is not block
    l, g = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        _assert_same_outputs(block(l, g), result.model(l, g))


@needs_self
@pytest.mark.parametrize("attn_cls", [Self_Attn, SeedSelfAttention, RefSelf])
def test_sagan_self_attention_swapped(attn_cls):
    model = _randomize(UserSagan(attn_cls)).eval()
    x = torch.randn(2, 3, 8, 8)
    before = _outputs(model, x)
    replaced = swap(model)
    assert [r.name for r in replaced] == ["attn"]
    assert replaced[0].new_type.endswith("SelfAttention2d")
    _assert_same_outputs(before, _outputs(model, x), atol=1e-4)
    back = unswap(model)
    assert [r.name for r in back] == ["attn"] and type(model.attn) is attn_cls
    _assert_same_outputs(before, _outputs(model, x), atol=1e-4)
