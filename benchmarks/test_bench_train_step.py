"""One training step (forward, loss, backward, Adam step) of the seeds' models: reference vs fused attention.

Cases: AttnVGG at 224 and at the dataset's native 512, RAN-56 at 224, and timm's ResNet-50 with CBAM in every
block (``resnet50-cbam``, built as ``attnfast train --model resnet50-cbam`` builds it: timm's own CbamModule for
reference, ``attnfast.swap`` for fused; ``cbam_left`` records how many timm CBAM modules swap left in place,
so a fused row that still runs timm's modules says so). Recorded per case: step time
(pytest-benchmark), peak memory of one step and, on a GPU, the largest batch that fits
(``providers.largest_batch``: predicted from the peaks of two batches, then bracketed and bisected on
``torch.cuda.OutOfMemoryError``). On a GPU each case runs in fp32 and under bf16 autocast
(the training CLI's default there). On a CPU the cases shrink to a tiny fp32 smoke (1/8-width models at 64 px, resnet50-cbam at 32 px; batch 2) and the
largest batch is not searched (recorded as None). The timm case needs timm (a test extra); without it it is skipped.
"""
import gc

import pytest
import torch

import harness
import providers

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


AMP_MODES = ["off", "bf16"] if GPU else ["off"]


def _peak(fn) -> int:
    with harness.PeakMemory() as pm:
        fn()
    return int(pm.peak)


def max_batch_on_gpu(model_name, size, kwargs, attention, amp, start, cap) -> dict:
    """``providers.step_largest_batch`` for one model: one model and optimizer, a fresh batch per probe."""
    step = providers.TrainStep(model_name, size, kwargs, attention, amp, harness.device())
    try:
        return providers.step_largest_batch(step, start, cap, _peak)
    finally:
        del step
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("attention", ["reference", "fused"])
@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, case, amp, attention):
    model_name, size, batch, kwargs, cap = CASES[case]
    timm_case = "cbam" in model_name
    if timm_case:
        pytest.importorskip("timm")
    search = max_batch_on_gpu(model_name, size, kwargs, attention, amp, batch, cap) if GPU else None
    step = providers.TrainStep(model_name, size, kwargs, attention, amp, harness.device())
    x, y = step.inputs(batch)
    extra = {"max_batch_search": search}
    if timm_case:
        from attnfast.models.timm_models import attention_modules

        extra["cbam_left"] = len(attention_modules(step.model))
    benchmark.group = f"train step {case} amp={amp}"
    # mode "fwd": the timed callable is the whole step (its backward and optimizer step run inside it)
    harness.measure(benchmark, step, [x, y], "fwd", op="train_step", provider=attention, case=case,
                    model=model_name, image_size=size, batch=batch, max_batch=search and search["max_batch"],
                    amp=amp, dtype=f"amp={amp}", shape=case, what="forward + focal loss + backward + Adam step", **extra)
