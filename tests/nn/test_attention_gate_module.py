"""The drop-in attention gates against their float64 references: MONAI's ``AttentionBlock`` (and attnfast's
reference copy of it) and Attention-Gated-Networks' ``GridAttentionBlock2D`` in every fused mode.

Training mode over several steps: outputs, input and parameter gradients, and the BatchNorm buffers
(running_mean, running_var, num_batches_tracked) after each step, for momentum 0.1, momentum None (cumulative
average), track_running_stats=False and affine=False; then eval mode (running statistics). State dicts load
both ways. The PyTorch path in float64 (exact to rounding), the Triton kernels in fp32 (interpreted on a CPU).
"""
import copy

import pytest
import torch

from attnfast.nn.attention_gate import AttentionBlock, GridAttentionBlock2D
from attnfast.reference.attention_gate import AttentionBlock as RefAttentionBlock
from attnfast.reference.attention_gate import GridAttentionBlock2D as RefGridAttentionBlock2D

BN_VARIANTS = {
    "momentum": {},
    "cumulative": {"momentum": None},
    "no_running_stats": {"track_running_stats": False, "running_mean": None, "running_var": None,
                         "num_batches_tracked": None},
    "not_affine": {"affine": False, "weight": None, "bias": None},
}


def _bn_variant(module, variant):
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            for k, v in BN_VARIANTS[variant].items():
                if k in ("weight", "bias"):
                    bn.register_parameter(k, None)
                elif k in ("running_mean", "running_var", "num_batches_tracked"):
                    bn.register_buffer(k, None)
                else:
                    setattr(bn, k, v)
    return module


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.2)
    return module


def _step(module, inputs, ups, dtype, device="cpu"):
    leaves = [t.to(device=device, dtype=dtype).detach().requires_grad_() for t in inputs]
    outs = module(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.to(device=o.device, dtype=o.dtype) for o, u in zip(outs, ups)])
    res = {f"out[{i}]": o.detach().double().cpu() for i, o in enumerate(outs)}
    res.update({f"d_input{i}": t.grad.double().cpu() for i, t in enumerate(leaves)})
    res.update({f"d{n}": p.grad.double().cpu() for n, p in module.named_parameters()})
    module.zero_grad()
    res.update({n: b.double().cpu() for n, b in module.named_buffers()})
    return res


def _compare(ref, fused, make_inputs, dtype, steps=2, rtol=1e-7, atol=1e-9, device="cpu"):
    """Train steps then one eval step: every named tensor equal to float64 rounding (``dtype`` float64) or to
    the given tolerances, scaled by the largest magnitude of the group for tensors whose exact value is 0."""
    for step in range(steps + 1):
        if step == steps:
            ref.eval()
            fused.eval()
        inputs, ups = make_inputs(step)
        want = _step(ref, inputs, ups, torch.float64)
        got = _step(fused, inputs, ups, dtype, device)
        assert want.keys() == got.keys()
        scale = max(v.abs().max().item() for v in want.values() if v.numel())
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, rtol=rtol, atol=atol * max(1.0, scale),
                                       msg=lambda m: f"step {step} {name}: {m}")


def _monai_inputs(B=2, fg=6, fl=5, H=5, W=4):
    def make(step):
        gen = torch.Generator().manual_seed(10 + step)
        g, x = (torch.randn(B, c, H, W, generator=gen, dtype=torch.float64) for c in (fg, fl))
        return (g, x), (torch.randn(B, fl, H, W, generator=gen, dtype=torch.float64),)
    return make


@pytest.mark.parametrize("variant", list(BN_VARIANTS))
def test_monai_block_matches_reference_in_float64(torch_backend, variant):
    ref = _bn_variant(_randomize(RefAttentionBlock(2, 4, 6, 5).double()), variant)
    fused = AttentionBlock(2, 4, 6, 5).double()
    _bn_variant(fused, variant)
    fused.load_state_dict(ref.state_dict())
    _compare(ref, fused, _monai_inputs(), torch.float64, steps=3)


def test_monai_block_matches_monai(torch_backend):
    attentionunet = pytest.importorskip("monai.networks.nets.attentionunet")
    monai_block = _randomize(attentionunet.AttentionBlock(2, 4, 6, 5).double())
    fused = AttentionBlock(2, 4, 6, 5).double()
    fused.load_state_dict(monai_block.state_dict())  # MONAI's keys load into the drop-in ...
    _compare(monai_block, fused, _monai_inputs(), torch.float64)
    fresh = attentionunet.AttentionBlock(2, 4, 6, 5).double()
    fresh.load_state_dict(fused.state_dict())  # ... and back
    for k, v in fused.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_monai_block_on_the_kernels(triton_backend, device):
    ref = _randomize(RefAttentionBlock(2, 4, 6, 5).double())
    fused = copy.deepcopy(ref)
    fused.__class__ = AttentionBlock
    _compare(ref, fused.to(device=device, dtype=torch.float32), _monai_inputs(), torch.float32, rtol=2e-5, atol=2e-5,
             device=device)


def test_monai_block_channels_last_and_layout(triton_backend, device):
    block = _randomize(AttentionBlock(2, 4, 6, 5)).to(device)
    g = torch.randn(2, 6, 5, 4, device=device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 5, 5, 4, device=device).to(memory_format=torch.channels_last)
    out = block(g, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(block)
    ref.__class__ = RefAttentionBlock
    torch.testing.assert_close(out, ref(g.contiguous(), x.contiguous()), rtol=1e-5, atol=1e-5)


def test_one_value_per_channel_in_training_is_refused(torch_backend):
    block = AttentionBlock(2, 4, 6, 5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 6, 1, 1), torch.randn(1, 5, 1, 1))


def _agn_inputs(C=5, CG=6, H=9, W=8, h=3, w=3, B=2):
    def make(step):
        gen = torch.Generator().manual_seed(20 + step)
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        g = torch.randn(B, CG, h, w, generator=gen, dtype=torch.float64)
        ups = (torch.randn(B, C, H, W, generator=gen, dtype=torch.float64),
               torch.randn(B, 1, H, W, generator=gen, dtype=torch.float64))
        return (x, g), ups
    return make


AGN_CASES = [(mode, k) for mode in ("concatenation", "concatenation_sigmoid", "concatenation_softmax") for k in (2, 1)]


@pytest.mark.parametrize("mode, k", AGN_CASES)
def test_agn_block_matches_reference_in_float64(torch_backend, mode, k):
    ref = _randomize(RefGridAttentionBlock2D(5, 6, 4, mode=mode, sub_sample_factor=(k, k)).double())
    fused = GridAttentionBlock2D(5, 6, 4, mode=mode, sub_sample_factor=(k, k)).double()
    fused.load_state_dict(ref.state_dict())
    _compare(ref, fused, _agn_inputs(), torch.float64)


@pytest.mark.parametrize("mode", ["concatenation", "concatenation_softmax"])
def test_agn_block_on_the_kernels(triton_backend, mode, device):
    ref = _randomize(RefGridAttentionBlock2D(5, 6, 20, mode=mode).double())
    fused = GridAttentionBlock2D(5, 6, 20, mode=mode)
    fused.load_state_dict(ref.state_dict())
    _compare(ref, fused.to(device), _agn_inputs(), torch.float32, steps=1, rtol=2e-5, atol=2e-5, device=device)


def test_agn_bad_options():
    with pytest.raises(ValueError, match="mode must be one of"):
        GridAttentionBlock2D(4, 4, mode="concatenation_debug")
    with pytest.raises(ValueError, match="sub_sample_factor"):
        GridAttentionBlock2D(4, 4, sub_sample_factor=(2, 1))
    with pytest.raises(ValueError, match="g must have 6 channels"):
        GridAttentionBlock2D(5, 6)(torch.randn(2, 5, 8, 8), torch.randn(2, 5, 4, 4))


def test_autocast_matches_eager_dtypes(torch_backend):
    """Under CPU autocast (bfloat16) the outputs have eager's dtypes and its values to bf16 accuracy."""
    ref = _randomize(RefAttentionBlock(2, 4, 6, 5)).eval()
    fused = copy.deepcopy(ref)
    fused.__class__ = AttentionBlock
    g, x = torch.randn(2, 6, 5, 4), torch.randn(2, 5, 5, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = fused(g, x), ref(g, x)
    assert out.dtype == want.dtype
    torch.testing.assert_close(out, want, rtol=5e-2, atol=5e-2)

