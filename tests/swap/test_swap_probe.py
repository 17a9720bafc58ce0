"""The probe: judged against float64, refusals that name the closest configuration with numbers, state the
fused module would not read (issue 14 item 6), and autocast (issue 14 item 7)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import public_layers as P
from attnfast.nn.cbam import CBAM as FusedCBAM
from attnfast.reference import CBAM as RefCBAM
from attnfast.reference import ResidualAttentionModule as RefRAM
from attnfast.swap import SwapWarning, swap
from attnfast.swap import families as registry
from attnfast.swap.families.cbam import Cbam
from attnfast.ops.grid_attention import grid_attention
from attnfast.swap.families.grid import Grid
from attnfast.swap.probe import PROBE_SEED
from attnfast.swap.reads import forward_reads
from seed_modules import AttentionBlock, SelfAttention, randomize


def _quiet_swap(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SwapWarning)
        return swap(model, **kwargs)


# --- float64 truth ------------------------------------------------------------------------------------------
def test_accurate_fused_module_is_not_blamed_for_eager_rounding():
    """AttnVGG's attn1 (AttentionBlock(256, 512, 256, 4), softmax): with this init one of the probe's 49,152 ReLU
    pre-activations sits at ~1e-7 and flips sign in fp32, which moves eager's W_g gradient far from the float64
    truth while the fused op stays on it. Compared with fp32 eager (the old probe) the accurate side was refused."""
    torch.manual_seed(397)
    block = AttentionBlock(256, 512, 256, 4, normalize_attn=True)
    # the probe's first run, reproduced: its input, the module's own parameters, eval/train as it is
    gen = torch.Generator().manual_seed(PROBE_SEED)
    l, g = Grid().spec(block).inputs(gen, torch.float32, torch.device("cpu"))

    def w_g_grad(fn, dtype):
        w = block.W_g.weight.detach().to(dtype).requires_grad_()
        a, pooled = fn(l.to(dtype), g.to(dtype), block.W_l.weight.to(dtype), w, block.phi.weight.to(dtype),
                       block.phi.bias.to(dtype))
        cot = torch.Generator().manual_seed(1)
        (pooled * torch.randn(pooled.shape, generator=cot, dtype=torch.float64).to(dtype)).sum().backward()
        return w.grad.double()

    def eager(l_, g_, wl, wg, pw, pb):
        c = F.conv2d(F.relu(F.conv2d(l_, wl) + F.interpolate(F.conv2d(g_, wg), scale_factor=4, mode="bilinear",
                                                             align_corners=False)), pw, pb)
        a = F.softmax(c.flatten(2), dim=2).view_as(c)
        return a, (a * l_).flatten(2).sum(2)

    truth = w_g_grad(eager, torch.float64)
    err_eager = (w_g_grad(eager, torch.float32) - truth).abs().max().item()
    err_fused = (w_g_grad(lambda *a: grid_attention(*a, 4, True), torch.float32) - truth).abs().max().item()
    scale = truth.abs().max().item()
    print(f"W_g gradient vs float64: eager fp32 {err_eager:.2g}, fused fp32 {err_fused:.2g} (max {scale:.2g})")
    assert err_eager > 2e-3 * scale > 10 * err_fused  # the old criterion (|fused - eager|) had to refuse
    result = _quiet_swap(block, dry_run=True)
    assert [r.family for r in result] == ["grid"] and not result.skipped


def test_refusal_names_the_closest_configuration_with_numbers():
    """A SAGAN copy with a 0.5 logit scale: none of the scales 1, 1/sqrt(d), 1/sqrt(C) fits. The reason names
    one configuration (the closest) and its measured errors, not a list of every candidate."""
    class HalfScale(SelfAttention):
        def forward(self, x):
            b, c, w, h = x.size()
            q = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
            k = self.key_conv(x).view(b, -1, w * h)
            attention = self.softmax(0.5 * torch.bmm(q, k))
            out = torch.bmm(self.value_conv(x).view(b, -1, w * h), attention.permute(0, 2, 1)).view(b, c, w, h)
            return self.gamma * out + x

    layer = randomize(HalfScale(16, None))
    result = _quiet_swap(nn.Sequential(layer))
    assert not result
    reason = result.skipped[0].reason
    assert reason.startswith("no fused configuration computes the same; the closest [tuple_output=False, scale=")
    assert reason.count("scale=") == 1 and "tuple_output=True" not in reason
    assert "max|fused - float64| = " in reason and "max|original - float64| = " in reason and "allowed" in reason


def test_forward_tied_to_float32_is_judged_against_itself():
    """A forward that cannot run in float64 (it casts to float32 midway): the original in its own dtype is the
    truth, and a matching fused configuration is still found."""
    class Float32Energy(SelfAttention):
        def forward(self, x):
            b, c, w, h = x.size()
            q = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
            k = self.key_conv(x).view(b, -1, w * h)
            attention = self.softmax(torch.bmm(q, k).float())
            out = torch.bmm(self.value_conv(x).view(b, -1, w * h), attention.permute(0, 2, 1)).view(b, c, w, h)
            return self.gamma * out + x

    layer = randomize(Float32Energy(16, None))
    with pytest.raises(RuntimeError):
        layer.double()(torch.randn(1, 16, 2, 2, dtype=torch.float64))
    layer.float()
    result = _quiet_swap(nn.Sequential(layer))
    assert [r.family for r in result] == ["sagan"] and dict(result[0].options)["tuple_output"] is False


# --- state the fused module does not read (issue 14 item 6) ---------------------------------------------------
class TemperatureBlock(AttentionBlock):
    """The seed's block with a temperature on its local features."""

    def __init__(self, *args, temperature=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature

    def forward(self, l, g):
        return super().forward(l / self.temperature, g)


def test_forward_reading_other_state_is_left_alone():
    """At temperature 1.0 the probe passes (it did before: the fused block was swapped in, and changing the
    temperature afterwards no longer changed the output). Now the layer is left alone, with the reason."""
    block = randomize(TemperatureBlock(8, 8, 4, 2))
    model = nn.Sequential(block)
    with pytest.warns(SwapWarning, match=r"reads self\.temperature, which the fused GridAttention does not use"):
        result = swap(model)
    assert not result and model[0] is block
    block.temperature = 2.0  # still the user's layer: the change takes effect
    l, g = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)
    with torch.no_grad():
        hot = model[0](l, g)[1]
        block.temperature = 1.0
        assert not torch.allclose(hot, model[0](l, g)[1])


def test_reads_are_found_through_helpers_super_getattr_and_comprehensions():
    class Base(nn.Module):
        def forward(self, x):
            return x * self.alpha

    class User(Base):
        @property
        def gain(self):
            return self.beta

        def helper(self, x):
            return x + getattr(self, "delta")

        def forward(self, x):
            y = super().forward(x) + self.gain
            return self.helper(sum(y * self.zeta for _ in range(2)))

    reads = forward_reads(User)
    assert {"alpha", "beta", "delta", "zeta"} <= reads.attrs and not reads.unknown
    assert {"gain", "helper"} <= reads.methods

    class Opaque(nn.Module):
        def forward(self, x):
            return some_function(self, x)  # noqa: F821 - never called

    assert forward_reads(Opaque).unknown


def test_seed_and_library_forwards_read_only_what_the_fused_modules_use():
    for cls in (AttentionBlock, SelfAttention, P.Attention, P.CBAM):
        assert not forward_reads(cls).unknown, cls
    assert forward_reads(AttentionBlock).attrs == {"W_l", "W_g", "phi", "up_factor", "normalize_attn"}


# --- autocast (issue 14 item 7) -------------------------------------------------------------------------------
def test_autocast_probe_swaps_a_module_that_matches_there():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), RefCBAM(16), P.Attention(16))
    randomize(model)
    result = _quiet_swap(model, autocast=torch.bfloat16)
    assert [(r.name, r.family) for r in result] == [("1", "cbam"), ("2", "biggan")] and not result.skipped
    oracle = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x), _unswapped(oracle)(x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2)


def _unswapped(model):
    from attnfast.swap import unswap

    unswap(model)
    return model


class AmpOffCBAM(FusedCBAM):
    """A fused CBAM that is right in float32 and 10% off under autocast (a stand-in for a module-side bug)."""

    def forward(self, x):
        out = super().forward(x)
        return out * 1.1 if torch.is_autocast_enabled("cpu") else out


class AmpOffFamily(Cbam):
    name = "amp_off_cbam"
    fused = AmpOffCBAM


def test_autocast_probe_leaves_a_module_that_fails_there_alone(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", (AmpOffFamily(),) + registry.FAMILIES)
    model = nn.Sequential(randomize(RefCBAM(16)))
    assert [r.family for r in _quiet_swap(copy.deepcopy(model))] == ["amp_off_cbam"]  # fine without autocast
    with pytest.warns(SwapWarning, match=r"the probe found different maths: output differs \(train mode, perturbed "
                                         r"parameters, under torch\.autocast\('cpu', bfloat16\)\): max\|fused - "
                                         r"float64\| = "):
        result = swap(model, autocast=torch.bfloat16)
    assert not result and result.skipped[0].family == "amp_off_cbam" and isinstance(model[0], RefCBAM)


def test_fused_residual_attention_is_swapped_under_autocast_only_if_it_matches_there():
    """The fused ResidualAttentionModule did not run under autocast (its gate got mixed dtypes; the module-side fix
    is another change): with autocast=torch.bfloat16 it is left alone saying so, or, once fixed, swapped and then
    it gives the reference's result under autocast."""
    model = nn.Sequential(RefRAM(8, encoder_depth=1)).eval()
    oracle = copy.deepcopy(model)
    result = _quiet_swap(model, autocast=torch.bfloat16)
    x = torch.randn(2, 8, 4, 4)
    if result:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = model(x), oracle(x)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2)
    else:
        assert result.skipped[0].family == "residual_attention"
        assert "under torch.autocast('cpu', bfloat16)" in result.skipped[0].reason
    assert [r.family for r in swap(copy.deepcopy(oracle))] == ["residual_attention"]  # without autocast: swapped


def test_autocast_probe_swaps_the_seed_grid_block_whose_dtypes_match():
    """Under autocast the seed's grid block returns a float32 pooled vector (its einsum/sum run outside the
    autocast lists); the fused module returns the same dtypes there, so the probe, which compares output
    dtypes under autocast (test_autocast_refusal_names_the_autocast_run), swaps it and the swapped model
    gives the original's outputs in the original's dtypes."""
    torch.manual_seed(0)
    original = nn.Sequential(randomize(AttentionBlock(8, 8, 4, 2)))
    model = copy.deepcopy(original)
    result = swap(model, autocast=torch.bfloat16)
    assert [r.family for r in result] == ["grid"] and not result.skipped
    l, g = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = original[0](l, g), model[0](l, g)
    assert [t.dtype for t in out] == [t.dtype for t in ref] and ref[1].dtype == torch.float32
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.float(), r.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("bad", [torch.float32, "bf16", (torch.bfloat16, torch.int8)])
def test_autocast_argument_is_checked(bad):
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16, torch.float16"):
        swap(nn.Sequential(nn.ReLU()), autocast=bad)
