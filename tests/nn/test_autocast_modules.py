"""Every fused module accepts what its reference accepts under autocast and computes what it computes.

Each fused module and its reference (attnfast.reference, same weights, fp32 parameters and input) run
forward under the same ``torch.autocast`` (bf16, and fp16: the CPU supports both) and backward outside it.
The outputs come back in the reference's dtypes, and the outputs and every gradient (input and
parameters) are compared with the three-way rule against the reference in float64 without autocast: the
fused module's error is at most ``FACTOR`` times eager autocast's own plus a small atol.

And outside autocast an input whose dtype or device differs from the module's parameters is a ValueError
saying what was expected (not torch's convolution error).
"""
import pytest
import torch

from attnfast.nn.cbam import CBAM, LightCBAM
from attnfast.nn.grid_attention import GridAttention
from attnfast.nn.residual_attention import ResidualAttentionModule
from attnfast.nn.self_attention import SelfAttention2d
from attnfast.reference.cbam import CBAM as RefCBAM
from attnfast.reference.cbam import LightCBAM as RefLightCBAM
from attnfast.reference.grid_attention import GridAttention as RefGridAttention
from attnfast.reference.residual_attention import ResidualAttentionModule as RefResidualAttentionModule
from attnfast.reference.self_attention import SelfAttention
from attnfast.testing import BASE_ATOL, assert_close_3way

FACTOR = 3.0  # autocast rounds at other points in the fused modules (they accumulate in fp32 inside)


def _modules():
    """name -> (reference, fused, input shapes)."""
    return {
        "ran": (RefResidualAttentionModule(8, 2), ResidualAttentionModule(8, 2), [(2, 8, 12, 12)]),
        "grid": (RefGridAttention(8, 6, 8, 2), GridAttention(8, 6, 8, 2), [(2, 8, 8, 8), (2, 6, 4, 4)]),
        "grid_sigmoid": (RefGridAttention(8, 6, 8, 2, normalize_attn=False),
                         GridAttention(8, 6, 8, 2, normalize_attn=False), [(2, 8, 8, 8), (2, 6, 4, 4)]),
        "sagan": (SelfAttention(16, tuple_output=False), SelfAttention2d(16, tuple_output=False), [(2, 16, 5, 5)]),
        "cbam": (RefCBAM(16, rd_channels=4), CBAM(16, rd_channels=4), [(2, 16, 5, 5)]),
        "light_cbam": (RefLightCBAM(16, rd_channels=4), LightCBAM(16, rd_channels=4), [(2, 16, 5, 5)]),
    }


def _run(module, inputs, upstream, amp):
    module.zero_grad(set_to_none=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast(leaves[0].device.type, dtype=amp, enabled=amp is not None):
        outs = module(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, upstream)])
    return [o.detach() for o in outs] + [t.grad for t in leaves] + [p.grad for _, p in module.named_parameters()]


@pytest.mark.parametrize("backend, amp", [
    ("torch_backend", torch.bfloat16), ("torch_backend", torch.float16), ("triton_backend", torch.float16),
    pytest.param("triton_backend", torch.bfloat16, marks=pytest.mark.gpu)], ids=str)
@pytest.mark.parametrize("name", list(_modules()))
def test_fused_module_under_autocast(request, backend, amp, name, device):
    request.getfixturevalue(backend)
    torch.manual_seed(0)
    ref, fused, shapes = _modules()[name]
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if name == "sagan":
            ref.gamma.fill_(0.7)
    fused.load_state_dict(ref.state_dict())
    eager = _modules()[name][0]
    eager.load_state_dict(ref.state_dict())
    ref64 = ref.double().to(device)
    eager, fused = eager.to(device), fused.to(device)
    inputs = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    upstream = _upstream(ref64, inputs)
    want = _run(ref64, inputs, upstream, None)
    got_eager = _run(eager, [t.float() for t in inputs], upstream, amp)
    got = _run(fused, [t.float() for t in inputs], upstream, amp)
    for o, e in zip(got, got_eager):  # the reference's output dtypes (and gradients in the leaves' dtypes)
        assert o.dtype == e.dtype
    assert_close_3way(got, want, got_eager, factor=FACTOR, atol=BASE_ATOL[amp], name=f"{name} {amp}")


def _upstream(module, inputs):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        outs = module(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]


@pytest.mark.parametrize("name", list(_modules()))
def test_input_dtype_other_than_parameters_is_a_value_error(torch_backend, name):
    """Outside autocast, torch's convolution would raise its own error (or silently promote): the fused
    modules and their references say what was expected."""
    for module in _modules()[name][:2]:
        shapes = _modules()[name][2]
        inputs = [torch.randn(s, dtype=torch.float64) for s in shapes]
        with pytest.raises(ValueError, match="float64.*float32|float32.*float64"):
            module(*inputs)
