"""One training step (forward, loss, backward, Adam step) of the seeds' models: reference vs fused attention.

Cases: AttnVGG at 224 and at the dataset's native 512, RAN-56 at 224, and timm's ResNet-50 with CBAM in every
block (``resnet50-cbam``, built as ``attnfast train --model resnet50-cbam`` builds it: timm's own CbamModule for
reference, ``attnfast.swap`` for fused; ``cbam_left`` records how many timm CBAM modules swap left in place,
so a fused row that still runs timm's modules says so). Recorded per case: step time
(pytest-benchmark), peak memory of one step and, on a GPU, the largest batch that fits (doubling, then
bisection, on ``torch.cuda.OutOfMemoryError``). On a GPU each case runs in fp32 and under bf16 autocast
(the training CLI's default there). On a CPU the cases shrink to a tiny fp32 smoke (1/8-width models at 64 px, resnet50-cbam at 32 px; batch 2) and the
largest batch is not searched (recorded as None). The timm case needs timm (a test extra); without it it is skipped.
"""
import gc

import pytest
import torch

import harness
from attnfast.train import build_model, compute_loss

GPU = harness.on_gpu()
# name -> (model, image size, batch, model kwargs, batch-search cap)
CASES = {
    "attnvgg-224": ("attnvgg", 224, 32, {}, 2048),
    "attnvgg-512": ("attnvgg", 512, 8, {}, 512),
    "ran56-224": ("ran56", 224, 32, {}, 2048),
    "resnet50-cbam-224": ("resnet50-cbam", 224, 32, {}, 2048),
} if GPU else {
    "attnvgg-64-smoke": ("attnvgg", 64, 2, {"width_mult": 0.125}, None),
    "ran56-64-smoke": ("ran56", 64, 2, {"width": 8}, None),
    "resnet50-cbam-32-smoke": ("resnet50-cbam", 32, 2, {}, None),
}


AMP = {"off": None, "bf16": torch.bfloat16}
AMP_MODES = ["off", "bf16"] if GPU else ["off"]


def _make_step(model_name, size, batch, kwargs, attention, amp="off"):
    dev = harness.device()
    model = build_model(model_name, 1, attention, kwargs).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 2, (batch,), device=dev)

    def step(x, y):
        with torch.autocast(dev, dtype=AMP[amp], enabled=AMP[amp] is not None):
            out = model(x)
            loss = compute_loss(out[0] if isinstance(out, tuple) else out, y, "binary")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    step.model = model
    return step, x, y


def _fits(model_name, size, batch, kwargs, attention, amp) -> bool:
    try:
        step, x, y = _make_step(model_name, size, batch, kwargs, attention, amp)
        step(x, y)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(model_name, size, kwargs, attention, cap, amp="off") -> int:
    """Largest batch (<= cap) whose training step runs without running out of GPU memory."""
    lo, hi = 0, 1
    while hi <= cap and _fits(model_name, size, hi, kwargs, attention, amp):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(model_name, size, mid, kwargs, attention, amp) else (lo, mid)
    return lo


@pytest.mark.parametrize("attention", ["reference", "fused"])
@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, case, amp, attention):
    model_name, size, batch, kwargs, cap = CASES[case]
    timm_case = "cbam" in model_name
    if timm_case:
        pytest.importorskip("timm")
    max_batch = largest_batch(model_name, size, kwargs, attention, cap, amp) if GPU else None
    step, x, y = _make_step(model_name, size, batch, kwargs, attention, amp)
    extra = {}
    if timm_case:
        from attnfast.models.timm_models import attention_modules

        extra["cbam_left"] = len(attention_modules(step.model))
    benchmark.group = f"train step {case} amp={amp}"
    # mode "fwd": the timed callable is the whole step (its backward and optimizer step run inside it)
    harness.measure(benchmark, step, [x, y], "fwd", op="train_step", provider=attention, case=case,
                    model=model_name, image_size=size, batch=batch, max_batch=max_batch,
                    amp=amp, dtype=f"amp={amp}", shape=case, what="forward + focal loss + backward + Adam step", **extra)
