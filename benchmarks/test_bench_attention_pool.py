"""Attention pooling with a linear score: eager vs torch.compile(eager) vs the fused op (``providers.attention_pool``).

Cases on a GPU: Learn to Pay Attention's AttnVGG_before blocks at 224 (attn1 on the projected pool-3 map
512x28x28... in LTPA's layout the three blocks see 512 channels at 56x56, 28x28 and 14x14 for a 224 input; B=32)
with g the global feature (B, 512, 1, 1), and timm's gcresnet33ts GlobalContext layers at 224 (256x56x56,
512x28x28, 1536x14x14, 1280x7x7; B=32: the whole layer, the MLP included), fp32 and bf16, fwd / bwd / fwd+bwd.
Recorded per case (``harness.measure``): time, peak memory, bytes saved for backward, and
``saved_beyond_input_bytes`` (what the block keeps beyond its inputs and weights).

On a CPU everything shrinks to a tiny fp32 smoke (``pytest benchmarks --benchmark-disable`` stays quick).
"""
import pytest
import torch

import harness
import providers
from test_bench_cbam import saved_beyond_input

GPU = harness.on_gpu()
LTPA = [(32, 512, 56), (32, 512, 28), (32, 512, 14)] if GPU else [(2, 16, 9)]
GC = [(32, 256, 56), (32, 512, 28), (32, 1536, 14), (32, 1280, 7)] if GPU else [(2, 16, 9)]
CASES = [("ltpa",) + s for s in LTPA] + [("gc",) + s for s in GC]
DTYPES = [torch.float32, torch.bfloat16] if GPU else [torch.float32]


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", providers.BLOCK_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_pool(benchmark, case, dtype, provider, mode):
    if case[0] == "gc":
        pytest.importorskip("timm")
    kind, b, c, hw = case
    dev = harness.device()
    block = providers.attention_pool(kind, c, dtype, dev, [provider])[provider]
    x = providers.randn((b, c, hw, hw), dtype, dev, 0)
    inputs = [x, providers.randn((b, c, 1, 1), dtype, dev, 1)] if kind == "ltpa" else [x]
    numel = x.numel()
    elt = x.element_size()
    # minimal traffic of the pooling: forward reads l once; backward reads l twice (recompute), writes dl
    moved = {"fwd": 1, "bwd": 3, "fwd+bwd": 4}[mode] * numel * elt
    benchmark.group = f"attention_pool {kind} {(b, c, hw, hw)} {dtype} {mode}"
    harness.measure(benchmark, block, inputs, mode, op=f"attention_pool_{kind}", provider=provider,
                    shape=str((b, c, hw, hw)), dtype=str(dtype), bytes=moved, flops=4 * numel,
                    saved_beyond_input_bytes=int(saved_beyond_input(lambda t: block(t, *inputs[1:]), x,
                                                                    list(block.parameters()) + inputs[1:])))
