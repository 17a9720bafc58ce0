"""CBAM: eager reference vs torch.compile(eager) vs the fused op, and a timm ResNet-50-CBAM training step.

Block cases: ResNet-50 stage outputs at 224 (256x56x56, 512x28x28, 1024x14x14, 2048x7x7), B=32 and 64,
fp32 and bf16, modes fwd / bwd / fwd+bwd, BatchNorm in train mode. Recorded per case (``harness.measure``):
time, peak memory, bytes saved for backward (``saved_bytes``, input and weights included) and, here,
``saved_beyond_input_bytes`` (what the block adds to its input). Goals on an H100/H200, bf16 fwd+bwd:
fused >= 2x eager and >= 1.3x compile in speed, saved activation memory <= 1/3 of eager's; they are
recorded in ``extra_info`` (``goal``), and benchmarks/report.py reads the ratios from the timings.

On a CPU everything shrinks to a tiny fp32 smoke (``pytest benchmarks --benchmark-disable`` stays quick);
the CPU comparison at real shapes is ``benchmarks/cpu_cbam.py`` (one process per provider).

Train step: ``timm.create_model('resnet50', block_args=dict(attn_layer='cbam'))``, forward + cross
entropy + backward + SGD step, with timm's CbamModule (reference) or every CbamModule replaced by
``attnfast.CBAM`` (fused, weights copied). GPU: 224 px, B=32, bf16 autocast; CPU: 32 px, B=2, fp32.
"""
import pytest
import torch

import harness
from attnfast.nn.cbam import CBAM
from attnfast.reference.cbam import CBAM as RefCBAM

GPU = harness.on_gpu()
STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
SHAPES = [(b, c, hw, hw) for b in (32, 64) for c, hw in STAGES] if GPU else [(2, 32, 14, 14)]
DTYPES = [torch.float32, torch.bfloat16] if GPU else [torch.float32]
PROVIDERS = ["eager", "compile", "fused"]
GOAL = "bf16 fwd+bwd on H100/H200: fused >= 2x eager, >= 1.3x compile; saved activations <= 1/3 eager"


def make_block(provider, channels, dtype, seed=0):
    torch.manual_seed(seed)
    ref = RefCBAM(channels)
    if provider == "fused":
        fused = CBAM(channels)
        fused.load_state_dict(ref.state_dict())
        ref = fused
    block = harness.cast_module(ref, dtype).train()
    return harness.compiled(block) if provider == "compile" else block


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
    block = make_block(provider, shape[1], dtype)
    x = torch.randn(shape, device=harness.device(), dtype=dtype, requires_grad=True)
    params = list(block.parameters())
    numel = x.numel()
    # minimal full-map traffic: fused forward reads x 3x and writes y; backward reads g, x 5x, writes dx
    moved = {"fwd": 4, "bwd": 6, "fwd+bwd": 10}[mode] * numel * x.element_size()
    benchmark.group = f"cbam {tuple(shape)} {dtype} {mode}"
    harness.measure(benchmark, block, [x], mode, op="cbam", provider=provider, shape=str(tuple(shape)),
                    dtype=str(dtype), bytes=moved, flops=10 * numel,
                    saved_beyond_input_bytes=int(saved_beyond_input(block, x, params)), goal=GOAL)


# ----------------------------------------------------------------------------------------------
# timm ResNet-50-CBAM training step
# ----------------------------------------------------------------------------------------------
def fuse_timm_cbam(model):
    """Replace every timm CbamModule / LightCbamModule in ``model`` by attnfast's (weights copied)."""
    from timm.layers.cbam import CbamModule, LightCbamModule

    from attnfast.nn.cbam import LightCBAM

    for name, m in list(model.named_modules()):
        cls = {CbamModule: CBAM, LightCbamModule: LightCBAM}.get(type(m))
        if cls is None:
            continue
        conv = m.spatial.conv.conv
        new = cls(m.channel.fc1.in_channels, rd_channels=m.channel.fc1.out_channels,
                  spatial_kernel_size=conv.kernel_size[0], mlp_bias=m.channel.fc1.bias is not None)
        new.spatial.conv.bn.eps, new.spatial.conv.bn.momentum = m.spatial.conv.bn.eps, m.spatial.conv.bn.momentum
        new.load_state_dict(m.state_dict())
        new.to(device=conv.weight.device, dtype=conv.weight.dtype).train(m.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


STEP = {"size": 224, "batch": 32, "amp": torch.bfloat16} if GPU else {"size": 32, "batch": 2, "amp": None}


@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_resnet50_cbam_train_step(benchmark, provider):
    timm = pytest.importorskip("timm")
    dev = harness.device()
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=5, block_args=dict(attn_layer="cbam")).to(dev).train()
    if provider == "fused":
        fuse_timm_cbam(model)
        assert not any(type(m).__name__ == "CbamModule" for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(STEP["batch"], 3, STEP["size"], STEP["size"], device=dev)
    y = torch.randint(0, 5, (STEP["batch"],), device=dev)

    def step():
        with torch.autocast(dev, dtype=STEP["amp"] or torch.bfloat16, enabled=STEP["amp"] is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if GPU:
            torch.cuda.synchronize()

    peak = None
    if not benchmark.disabled:  # the CI smoke (--benchmark-disable) runs one step only
        step()  # warm-up (and cuDNN/Triton compile on a GPU)
        with harness.PeakMemory() as pm:
            step()
        peak = int(pm.peak)
    benchmark.group = f"resnet50-cbam train step {STEP}"
    benchmark.extra_info.update(dict(harness.device_info()), op="resnet50_cbam_step", provider=provider,
                                mode="train step", shape=f"B={STEP['batch']}, {STEP['size']}px",
                                dtype=str(STEP["amp"] or torch.float32), peak_mem_bytes=peak)
    benchmark.pedantic(step, rounds=10 if GPU else 3, iterations=1, warmup_rounds=0)
