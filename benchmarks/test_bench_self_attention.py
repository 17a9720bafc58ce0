"""SAGAN self-attention: the seed's layer (eager, compiled) vs PyTorch's attention kernels vs attnfast.

Providers (``providers.sagan``; all compute ``gamma * attention(x) + x`` with the same 1x1 convs, scale 1):

- ``eager``: ``attnfast.reference.SelfAttention`` (stores the B x N x N matrix); ``compile``: the same
  layer through ``harness.compiled`` (its attention-matrix output unused, so inductor may drop it);
- ``sdpa_default`` / ``sdpa_mem_efficient`` / ``sdpa_flash_padded`` / ``flex``: the attention core through
  PyTorch's kernels on the conv outputs in SDPA's contiguous ``(B, heads, N, d)`` layout, the way users
  call them (``sdpa_providers.py``). ``extra_info["sdpa_backend"]`` names the backend each is bound to
  and the attention ops one profiled forward ran. On a CPU, ``sdpa_mem_efficient`` has no kernel and
  FlexAttention no backward (it refuses inputs that require grad): those cases are skipped with the reason;
- ``chunked``: ``SelfAttention2d`` with ``ATTNFAST_BACKEND=torch`` (CUDA: the batched chunked path;
  CPU: the blocked CPU path);
- ``fused``: ``SelfAttention2d`` with the default dispatch (Triton on CUDA; on a CPU this is the
  blocked CPU path again, so the CPU smoke runs it only once as a check).

``cpu_sdpa_compare.py`` compares the attention core alone on CPU (one provider per process, so peak
RSS is honest).

GPU: B = 8, C = 128 (d_qk = 16), N from 32x32 to 256x256, bf16; runs that do not fit are skipped
with the OOM noted. CPU (CI smoke): one tiny shape. ``extra_info`` carries ``pairs`` = B * N^2
query-key pairs (one exp each: the exp unit, not the d_qk = 16 matmul, bounds the fused kernel), so
pairs/s can be reported against the hardware's exp throughput.
"""
import pytest
import torch

import attnfast.config

import harness
import providers
import sdpa_providers

C = 128
if harness.on_gpu():
    CASES = [(8, C, s, s) for s in (32, 64, 128, 256)]
    DTYPES = [torch.bfloat16]
else:
    CASES = [(2, 16, 8, 8)]
    DTYPES = [torch.float32]
PROVIDERS = providers.SAGAN_PROVIDERS


def cpu_unsupported(provider, mode):
    """Why a provider cannot run in ``mode`` on a CPU, or None."""
    if harness.on_gpu():
        return None
    if provider == "sdpa_mem_efficient":
        return "SDPA has no memory-efficient kernel on a CPU"
    if provider == "flex":
        return "FlexAttention on a CPU refuses inputs that require grad (it has no backward there)"
    return None


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda s: "x".join(map(str, s)))
def test_self_attention(benchmark, monkeypatch, case, dtype, provider, mode):
    b, c, h, w = case
    reason = cpu_unsupported(provider, mode)
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(attnfast.config, "BACKEND", "auto")  # chunked sets torch itself, around its calls
    fn = providers.sagan(c, dtype, harness.device(), [provider])[provider]
    x = providers.randn(case, dtype, harness.device(), 0)
    n = h * w
    d = max(c // 8, 1)
    pairs = b * n * n
    # FLOPs of the attention itself: q^T k (2 d per pair) and P v (2 C per pair); backward ~2.5x.
    flops_fwd = pairs * (2 * d + 2 * c)
    flops = {"fwd": flops_fwd, "bwd": int(2.5 * flops_fwd), "fwd+bwd": int(3.5 * flops_fwd)}[mode]
    benchmark.group = f"self_attention B={b} C={c} {h}x{w} {dtype} {mode}"
    extra = {}
    if provider in sdpa_providers.PROVIDERS:
        extra["sdpa_backend"] = fn.backend(x)
        x.grad = None
        fn.zero_grad(set_to_none=True)
    try:
        harness.measure(benchmark, fn, [x], mode, op="self_attention", provider=provider, shape=str(case),
                        dtype=str(dtype), n=n, pairs=pairs, exps=pairs * (1 if mode == "fwd" else 2),
                        flops=flops, backend="torch" if provider == "chunked" else "auto", **extra)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} out of memory at {case} {dtype}")
