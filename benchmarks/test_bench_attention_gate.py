"""Attention U-Net gates: eager reference vs torch.compile(reference) vs the fused module
(``providers.attention_gate``), in training mode (BatchNorm on batch statistics).

GPU shapes: MONAI's ``AttentionBlock`` of an Attention U-Net level at 256x256 with 64 channels (f_int 32) and
at 128x128 with 128 channels (f_int 64); Attention-Gated-Networks' ``GridAttentionBlock2D`` with x 64 ch at
256x256, g 128 ch at 128x128, F_int 64 (theta 2x2 stride 2), B in {4, 16}, fp32 and bf16. On a CPU (CI smoke)
one tiny shape per kind runs once. ``extra_info.bytes``: the minimal HBM traffic of the timed mode.
"""
import pytest
import torch

import harness
import providers

# (kind, name, C (x), C_g, F_int, H=W of x)
GPU_BLOCKS = [("monai", "monai-64@256", 64, 64, 32, 256), ("monai", "monai-128@128", 128, 128, 64, 128),
              ("agn", "agn-64@256", 64, 128, 64, 256)]
if harness.on_gpu():
    CASES = [(*blk, B) for blk in GPU_BLOCKS for B in (4, 16)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    CASES = [("monai", "cpu-smoke", 8, 8, 4, 8, 2), ("agn", "cpu-smoke", 8, 16, 8, 8, 2)]
    DTYPES = [torch.float32]


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", providers.ATTENTION_GATE_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda k: f"{k[1]}-{k[0]}-B{k[6]}")
def test_attention_gate(benchmark, case, dtype, provider, mode):
    kind, name, c, cg, fi, hw, B = case
    dev = harness.device()
    module = providers.attention_gate(kind, c, cg, fi, dtype, dev, [provider])[provider]
    inputs = providers.attention_gate_inputs(kind, B, c, cg, hw, dtype, dev)
    traffic = providers.attention_gate_traffic(kind, B, c, cg, hw, inputs[0].element_size())
    benchmark.group = f"attention_gate {name} B={B} {dtype} {mode}"
    harness.measure(benchmark, module, inputs, mode, op="attention_gate", provider=provider, block=name,
                    shape=f"{kind}: x=({B},{c},{hw},{hw}) C_g={cg} F_int={fi}", dtype=str(dtype),
                    bytes=traffic[mode])
