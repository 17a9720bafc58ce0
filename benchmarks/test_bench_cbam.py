"""CBAM: eager reference vs torch.compile(eager) vs the fused op, and a timm ResNet-50-CBAM training step.

Block cases: ResNet-50 stage outputs at 224 (256x56x56, 512x28x28, 1024x14x14, 2048x7x7), B=32 and 64,
fp32 and bf16, modes fwd / bwd / fwd+bwd, BatchNorm in train mode. Recorded per case (``harness.measure``):
time, peak memory, bytes saved for backward (``saved_bytes``, input and weights included) and, here,
``saved_beyond_input_bytes`` (what the block adds to its input). Goals on an H100/H200, bf16 fwd+bwd:
fused >= 2x eager and >= 1.3x compile in speed, saved activation memory <= 1/3 of eager's; they are
recorded in ``extra_info`` (``goal``), and benchmarks/report.py reads the ratios from the timings.

Blocks come from ``providers.cbam``: one module per (channels, dtype), so ``compile`` compiles once per
input shape (it used to build a block per test: Dynamo recompiled the same ``forward`` until its recompile
limit and then ran every B=64 case eagerly, reported as "compile"); ``harness.measure`` fails a compile
case whose compiled graph did not run.

On a CPU everything shrinks to a tiny fp32 smoke (``pytest benchmarks --benchmark-disable`` stays quick);
the CPU comparison at real shapes is ``benchmarks/cpu_cbam.py`` (one process per provider).

The timm ResNet-50-CBAM training step (timm's CbamModule vs ``attnfast.swap``'s) is a case of
``test_bench_train_step.py`` (``resnet50-cbam-224``).
"""
import pytest
import torch

import harness
import providers

GPU = harness.on_gpu()
STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
SHAPES = [(b, c, hw, hw) for b in (32, 64) for c, hw in STAGES] if GPU else [(2, 32, 14, 14)]
DTYPES = [torch.float32, torch.bfloat16] if GPU else [torch.float32]
PROVIDERS = providers.BLOCK_PROVIDERS
GOAL = "bf16 fwd+bwd on H100/H200: fused >= 2x eager, >= 1.3x compile; saved activations <= 1/3 eager"


def saved_beyond_input(fn, x, params):
    """Bytes autograd saves in one forward, not counting ``x`` and the module's weights."""
    with harness.SavedBytes() as sb:
        sb._seen.update((t.untyped_storage().data_ptr(), t.device) for t in [x, *params])
        out = fn(x)
    del out
    return sb.total


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cbam(benchmark, shape, dtype, provider, mode):
    block = providers.cbam(shape[1], dtype, harness.device(), [provider])[provider]
    x = providers.randn(shape, dtype, harness.device(), 0)
    params = list(block.parameters())
    numel = x.numel()
    # minimal full-map traffic: fused forward reads x 3x and writes y; backward reads g, x 5x, writes dx
    moved = {"fwd": 4, "bwd": 6, "fwd+bwd": 10}[mode] * numel * x.element_size()
    benchmark.group = f"cbam {tuple(shape)} {dtype} {mode}"
    harness.measure(benchmark, block, [x], mode, op="cbam", provider=provider, shape=str(tuple(shape)),
                    dtype=str(dtype), bytes=moved, flops=10 * numel,
                    saved_beyond_input_bytes=int(saved_beyond_input(block, x, params)), goal=GOAL)
