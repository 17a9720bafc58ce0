"""Every op at the seeds' real model shapes on CUDA, in every dtype, forward and all gradients vs float64.

GPU-marked (skipped without a GPU). The CPU/interpreter matrix of tests/ops and tests/nn runs on
CUDA too on a GPU machine (its tests take the ``device`` fixture); this file adds the shapes the
models really run, which the interpreter is too slow for:

- grid attention: AttnVGG's two attention blocks (attnfast/models/attnvgg.py: ``attn1`` on pool-3 and
  ``attn2`` on pool-4, both guided by pool-5, A = 256) at 224 and 512 inputs, softmax and sigmoid;
- SAGAN self-attention: C = 64..512 up to 128x128, the seed's layer and the pooled-key, multi-head
  and value_dim variants;
- residual gate: the three attention stages of RAN-56 at 224 (attnfast/models/ran.py).

tests/test_gpu_matrix.py checks on the CPU that these tables match the models and that a GPU run
collects every case below. Each case runs the kernels (``kernels_only``: a fallback to the PyTorch
path on CUDA fails the test) and builds its float64 reference on the GPU; the largest, SAGAN at
128x128 (N = 16384), materializes B * heads * N^2 float64 scores (2 GiB per sample and head) a few
times over, so those cases use B = 1.

Precisions: fp32 is IEEE (TF32 off: the conftest), fp16 and bf16 compare with eager PyTorch in the
same dtype. Grid attention also runs ``tf32``: fp32 with TF32 allowed for convolutions and matmuls
(PyTorch's default for cuDNN), the kernels' dots in TF32 then; its yardstick is eager fp16, whose
inputs carry the same 10-bit mantissa (eager fp32 may or may not use TF32 for a 1x1 conv).

``test_checks_at_tiny_shapes`` runs the same check functions at tiny shapes on any machine (the
interpreter on a CPU), so a mistake in this file shows up in CI, not first on a GPU.

Adding an op: a ``<OP>_REAL`` table, a ``check_real_<op>(case, precision, device)``, an entry in
``OPS`` and tiny cases in ``TINY``; tests/test_gpu_matrix.py derives its expected counts from ``OPS``.
"""
from __future__ import annotations

import gc
import traceback

import pytest
import torch

from op_checks import (check_attention_pool, check_cbam, check_gate, check_grid, check_sagan, check_sagan_variant,
                       tf32)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# AttnVGG (width 1): (name, B, C_l, C_g, A, H = W of l, up_factor); g is pool-5 at H / up.
GRID_REAL = [
    ("pool3@224", 8, 256, 512, 256, 28, 4),
    ("pool4@224", 8, 512, 512, 256, 14, 2),
    ("pool3@512", 2, 256, 512, 256, 64, 4),
    ("pool4@512", 2, 512, 512, 256, 32, 2),
]
# SAGAN: (B, C, H, W, SelfAttention2d options); {} is the seed's layer (checked against the reference).
SAGAN_REAL = [
    (1, 64, 128, 128, {}),
    (1, 128, 128, 128, {}),
    (4, 128, 64, 64, {}),
    (2, 256, 64, 64, {}),
    (4, 512, 32, 32, {}),
    (1, 64, 128, 128, {"pool": True}),
    (1, 256, 128, 128, {"pool": True}),
    (2, 512, 64, 64, {"pool": True}),
    (2, 256, 64, 64, {"heads": 2}),
    (2, 128, 64, 64, {"value_dim": 64}),
    (2, 512, 32, 32, {"heads": 4, "value_dim": 256}),
    (1, 128, 128, 128, {"pool": True, "heads": 2, "value_dim": 64}),
]
# RAN-56 at 224, B = 32 (the benchmark batch): the gate's (mask, trunk) shape per stage; + channels_last.
GATE_REAL = [
    ("stage1", (32, 256, 56, 56), False),
    ("stage2", (32, 512, 28, 28), False),
    ("stage3", (32, 1024, 14, 14), False),
    ("stage1-channels_last", (32, 256, 56, 56), True),
]

# CBAM in timm's ResNet-50 at 224, B = 32 (the benchmark batch): each stage's block output; light = LightCBAM.
CBAM_REAL = [
    ("stage1", (32, 256, 56, 56), False),
    ("stage2", (32, 512, 28, 28), False),
    ("stage3", (32, 1024, 14, 14), False),
    ("stage4", (32, 2048, 7, 7), False),
    ("stage1-light", (32, 256, 56, 56), True),
]

# Attention pooling: Learn to Pay Attention's AttnVGG_before at 224 (512 x 56/28/14, g the (B, 512, 1, 1) global
# feature; softmax and sigmoid) and timm gcresnet33ts's GlobalContext pooling at 224, B = 32 (no g, a bias).
POOL_REAL = [
    ("ltpa-attn1", (8, 512, 56), "pooled", False),
    ("ltpa-attn2", (8, 512, 28), "pooled", False),
    ("ltpa-attn3", (8, 512, 14), "pooled", False),
    ("gc-stage1", (32, 256, 56), None, True),
    ("gc-stage3", (32, 1536, 14), None, True),
]


def check_real_pool(case, precision, device):
    _, (b, c, hw), g_kind, bias = case
    modes = (("softmax", "sum"), ("sigmoid", "mean")) if g_kind else (("softmax", "sum"),)
    for norm, red in modes:
        check_attention_pool(b, c, hw, hw, DTYPES[precision], g_kind=g_kind, normalize=norm, reduce=red, bias=bias,
                             device=device, channels_last=c == 256)


def check_real_grid(case, precision, device):
    name, B, C, Cg, A, H, up = case
    for normalize in (True, False):
        if precision == "tf32":
            with tf32(True):
                check_grid(B, C, Cg, A, H, H, up, normalize, torch.float32, device=device,
                           eager_dtype=torch.float16)
        else:
            check_grid(B, C, Cg, A, H, H, up, normalize, DTYPES[precision], device=device)


def check_real_sagan(case, precision, device):
    b, c, h, w, options = case
    if options:
        check_sagan_variant((b, c, h, w), options, DTYPES[precision], device=device)
    else:  # default init (logits of order sqrt(d)), as a model starts
        check_sagan((b, c, h, w), DTYPES[precision], device=device, qk_mult=1.0)


def check_real_gate(case, precision, device):
    _, shape, channels_last = case
    check_gate(shape, DTYPES[precision], device=device, channels_last=channels_last)


def check_real_cbam(case, precision, device):
    _, shape, light = case
    for train in (True, False):  # BatchNorm on batch statistics, then on running statistics
        check_cbam(shape, DTYPES[precision], light, train, device, channels_last=shape[1] == 256 and not light)


def _sagan_id(case):
    b, c, h, w, options = case
    opts = "".join(f"-{k}{'' if v is True else v}" for k, v in options.items())
    return f"B{b}C{c}-{h}x{w}{opts or '-seed'}"


# op -> (cases, case id, precisions, check)
OPS = {
    "grid_attention": (GRID_REAL, lambda c: c[0], ("fp32", "tf32", "fp16", "bf16"), check_real_grid),
    "self_attention": (SAGAN_REAL, _sagan_id, ("fp32", "fp16", "bf16"), check_real_sagan),
    "residual_gate": (GATE_REAL, lambda c: c[0], ("fp32", "fp16", "bf16"), check_real_gate),
    "cbam": (CBAM_REAL, lambda c: c[0], ("fp32", "fp16", "bf16"), check_real_cbam),
    "attention_pool": (POOL_REAL, lambda c: c[0], ("fp32", "fp16", "bf16"), check_real_pool),
}


# The same checks at tiny shapes (same case layout as the tables above).
TINY = {
    "grid_attention": [("tiny", 2, 8, 16, 16, 4, 2)],
    "self_attention": [(2, 16, 6, 5, {}), (2, 32, 5, 6, {"pool": True, "heads": 2, "value_dim": 8})],
    "residual_gate": [("tiny", (2, 4, 5, 6), False), ("tiny-channels_last", (2, 4, 5, 6), True)],
    "cbam": [("tiny", (2, 20, 9, 9), False), ("tiny-light", (2, 8, 5, 3), True)],
    "attention_pool": [("tiny-ltpa", (2, 40, 6), "pooled", False), ("tiny-gc", (2, 8, 5), None, True)],
}


def matrix():
    params = []
    for op, (cases, case_id, precisions, _) in OPS.items():
        for case in cases:
            for precision in precisions:
                params.append(pytest.param(op, case, precision, id=f"{op}-{case_id(case)}-{precision}"))
    return params


@pytest.mark.gpu
@pytest.mark.parametrize("op, case, precision", matrix())
def test_real_shape(op, case, precision, device, kernels_only):
    failure = None
    try:
        OPS[op][3](case, precision, device)
        torch.cuda.synchronize()
    except Exception:
        # Report the traceback as text: the exception kept by pytest would hold this case's frames and
        # their GPU tensors (GiBs at these shapes) and starve the cases after it.
        failure = traceback.format_exc()[-8000:]
    gc.collect()
    torch.cuda.empty_cache()
    if failure:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("op", list(OPS))
def test_checks_at_tiny_shapes(op, device, triton_backend, kernels_only):
    """Every precision this machine can run (bf16 needs a GPU: the interpreter's bf16 is wrong)."""
    _, _, precisions, check = OPS[op]
    for case in TINY[op]:
        for precision in precisions:
            if precision == "bf16" and device != "cuda":
                continue
            check(case, precision, device)
