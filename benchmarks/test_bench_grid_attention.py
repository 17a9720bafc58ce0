"""Grid attention (AttnVGG / AttnMel): eager reference vs torch.compile(reference) vs the fused module.

GPU shapes are AttnVGG's two attention blocks (A = 256 compatibility channels, softmax attention):
pool-3 (l: 256 ch, 28x28 at a 224 input / 64x64 at 512; g: 512 ch at 1/4 size, up_factor 4) and
pool-4 (l: 512 ch, 14x14 / 32x32; g at 1/2 size, up_factor 2), B in {8, 32, 64}, fp32 and bf16.
On a CPU (CI smoke) one tiny shape runs once.

extra_info carries what the report needs for the fused forward's roofline:
``bytes_fwd`` (minimal HBM traffic: read l, g and the weights; write a and pooled) and ``flops_fwd``
(2*B*H*W*A*C_l for W_l l, 2*B*h*w*A*C_g for W_g g, ~12*B*H*W*A for the bilinear tap, add, ReLU and
phi, 2*B*H*W*C_l for the pooling), plus ``bytes``/``flops`` for the timed mode.
"""
import pytest
import torch

import harness
from attnfast.nn.grid_attention import GridAttention
from attnfast.reference.grid_attention import GridAttention as RefGridAttention

A = 256
# (name, C_l, H=W of l, C_g, up_factor)
GPU_BLOCKS = [("pool3@224", 256, 28, 512, 4), ("pool3@512", 256, 64, 512, 4),
              ("pool4@224", 512, 14, 512, 2), ("pool4@512", 512, 32, 512, 2)]
if harness.on_gpu():
    CASES = [(name, B, c, hw, cg, up, A) for name, c, hw, cg, up in GPU_BLOCKS for B in (8, 32, 64)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    CASES = [("cpu-smoke", 2, 16, 8, 16, 2, 16)]
    DTYPES = [torch.float32]
PROVIDERS = ("eager", "compile", "fused")

_MODULES = {}


def _modules(c, cg, up, a, dtype):
    """One reference weight set per block; eager and fused share it, compile wraps the eager module."""
    key = (c, cg, up, a, dtype)
    if key not in _MODULES:
        torch.manual_seed(0)
        ref = harness.cast_module(RefGridAttention(c, cg, a, up, normalize_attn=True), dtype)
        fused = harness.cast_module(GridAttention(c, cg, a, up, normalize_attn=True), dtype)
        fused.load_state_dict(ref.state_dict())
        _MODULES[key] = {"eager": ref, "compile": harness.compiled(ref), "fused": fused}
    return _MODULES[key]


def roofline(B, c, hw, cg, up, a, elt):
    """Minimal bytes and FLOPs of the forward (see the module docstring)."""
    px, px_g = B * hw * hw, B * (hw // up) ** 2
    bytes_fwd = elt * (px * c + px_g * cg + a * (c + cg + 1) + 1 + px + B * c)
    flops_fwd = 2 * px * a * c + 2 * px_g * a * cg + 12 * px * a + 2 * px * c
    # backward: dl = W_l^T dz and dW_l = dz l^T (2 GEMMs of the forward's size) + the low-res W_g
    # grads + the per-pixel work; reads l, g, weights, grads; writes dl, dg, weight grads.
    flops_bwd = 4 * px * a * c + 4 * px_g * a * cg + 16 * px * a + 4 * px * c
    bytes_bwd = elt * (2 * px * c + 2 * px_g * cg + 2 * a * (c + cg + 1) + px + B * c)
    return {"fwd": (bytes_fwd, flops_fwd), "bwd": (bytes_bwd, flops_bwd),
            "fwd+bwd": (bytes_fwd + bytes_bwd, flops_fwd + flops_bwd)}


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda k: f"{k[0]}-B{k[1]}")
def test_grid_attention(benchmark, case, dtype, provider, mode):
    name, B, c, hw, cg, up, a = case
    dev = harness.device()
    module = _modules(c, cg, up, a, dtype)[provider]
    l = torch.randn(B, c, hw, hw, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(B, cg, hw // up, hw // up, device=dev, dtype=dtype, requires_grad=True)
    roof = roofline(B, c, hw, cg, up, a, l.element_size())
    benchmark.group = f"grid_attention {name} B={B} {dtype} {mode}"
    harness.measure(benchmark, module, [l, g], mode, op="grid_attention", provider=provider, block=name,
                    shape=f"l=({B},{c},{hw},{hw}) g=({B},{cg},{hw // up},{hw // up}) A={a} up={up}",
                    dtype=str(dtype), bytes=roof[mode][0], flops=roof[mode][1],
                    bytes_fwd=roof["fwd"][0], flops_fwd=roof["fwd"][1])
