"""Grid attention (AttnVGG / AttnMel): eager reference vs torch.compile(reference) vs the fused module
(``providers.grid``).

GPU shapes are AttnVGG's two attention blocks (A = 256 compatibility channels, softmax attention):
pool-3 (l: 256 ch, 28x28 at a 224 input / 64x64 at 512; g: 512 ch at 1/4 size, up_factor 4) and
pool-4 (l: 512 ch, 14x14 / 32x32; g at 1/2 size, up_factor 2), B in {8, 32, 64}, fp32 and bf16.
On a CPU (CI smoke) one tiny shape runs once.

extra_info carries what the report needs for the fused forward's roofline: ``bytes_fwd`` and ``flops_fwd``
(``providers.grid_roofline``: minimal HBM traffic and FLOPs), plus ``bytes``/``flops`` for the timed mode.
"""
import pytest
import torch

import harness
import providers

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
PROVIDERS = providers.GRID_PROVIDERS


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda k: f"{k[0]}-B{k[1]}")
def test_grid_attention(benchmark, case, dtype, provider, mode):
    name, B, c, hw, cg, up, a = case
    dev = harness.device()
    module = providers.grid(c, cg, a, up, dtype, dev, [provider])[provider]
    l, g = providers.grid_inputs(B, c, hw, cg, up, dtype, dev)
    roof = providers.grid_roofline(B, c, hw, cg, up, a, l.element_size())
    benchmark.group = f"grid_attention {name} B={B} {dtype} {mode}"
    harness.measure(benchmark, module, [l, g], mode, op="grid_attention", provider=provider, block=name,
                    shape=f"l=({B},{c},{hw},{hw}) g=({B},{cg},{hw // up},{hw // up}) A={a} up={up}",
                    dtype=str(dtype), bytes=roof[mode][0], flops=roof[mode][1],
                    bytes_fwd=roof["fwd"][0], flops_fwd=roof["fwd"][1])
