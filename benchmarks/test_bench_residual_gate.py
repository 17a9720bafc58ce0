"""Residual-attention gate ``(1 + sigmoid(m)) * t``: eager vs torch.compile vs the fused op (``providers.gate``)."""
import pytest
import torch

import harness
import providers

# RAN-56 stage outputs at 224 (B=32): 256x56x56, 512x28x28, 1024x14x14. CPU smoke: one tiny shape.
SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14)] if harness.on_gpu() else [(2, 8, 14, 14)]
DTYPES = [torch.float32, torch.bfloat16] if harness.on_gpu() else [torch.float32]
PROVIDERS = providers.BLOCK_PROVIDERS


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_gate(benchmark, shape, dtype, provider, mode):
    dev = harness.device()
    m = providers.randn(shape, dtype, dev, 0)
    t = providers.randn(shape, dtype, dev, 1)
    numel = m.numel()
    elt = m.element_size()
    moved = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode] * numel * elt  # minimal HBM traffic
    benchmark.group = f"residual_gate {tuple(shape)} {dtype} {mode}"
    harness.measure(benchmark, providers.gate([provider])[provider], [m, t], mode, op="residual_gate", provider=provider,
                    shape=str(tuple(shape)), dtype=str(dtype), bytes=moved, flops=4 * numel)
