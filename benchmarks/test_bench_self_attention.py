"""SAGAN self-attention: eager reference vs SDPA vs attnfast's PyTorch path vs the fused Triton kernels.

Providers (all compute ``gamma * attention(x) + x`` with the same 1x1 convs, scale 1):

- ``eager``: ``attnfast.reference.SelfAttention`` (stores the B x N x N matrix);
- ``sdpa_default`` / ``sdpa_flash_padded``: ``F.scaled_dot_product_attention`` on the conv outputs
  in SDPA's contiguous ``(B, heads, N, d)`` layout, the way users call it (``sdpa_providers.py``):
  the default dispatch (CPU: math, since d_qk != d_v rules out flash; GPU: memory-efficient or
  cuDNN), and flash forced with q/k zero-padded to d_v. ``extra_info["sdpa_backend"]`` names the
  backend each ran;
- ``chunked``: ``SelfAttention2d`` with ``ATTNFAST_BACKEND=torch`` (CUDA: the batched chunked path;
  CPU: the blocked CPU path);
- ``fused``: ``SelfAttention2d`` with the default dispatch (Triton on CUDA; on a CPU this is the
  blocked CPU path again, so the CPU smoke runs it only once as a check).

``cpu_sdpa_compare.py`` compares the attention core alone on CPU (one provider per process, so peak
RSS is honest).

GPU: B = 8, C = 128 (d_qk = 16), N from 32x32 to 256x256, bf16; eager / SDPA runs that do not
fit are skipped with the OOM noted. CPU (CI smoke): one tiny shape. ``extra_info`` carries
``pairs`` = B * N^2 query-key pairs (one exp each: the exp unit, not the d_qk = 16 matmul, bounds
the fused kernel), so pairs/s can be reported against the hardware's exp throughput.
"""
import os

import pytest
import torch

import harness
import sdpa_providers
from attnfast.nn.self_attention import SelfAttention2d
from attnfast.reference.self_attention import SelfAttention

C = 128
if harness.on_gpu():
    CASES = [(8, C, s, s) for s in (32, 64, 128, 256)]
    DTYPES = [torch.bfloat16]
else:
    CASES = [(2, 16, 8, 8)]
    DTYPES = [torch.float32]
PROVIDERS = ("eager",) + sdpa_providers.PROVIDERS + ("chunked", "fused")

_MODULES = {}


def _modules(c, dtype):
    key = (c, dtype)
    if key not in _MODULES:
        torch.manual_seed(0)
        ref = harness.cast_module(SelfAttention(c), dtype)
        with torch.no_grad():
            ref.gamma.fill_(0.5)
        fused = harness.cast_module(SelfAttention2d(c, tuple_output=False), dtype)
        fused.load_state_dict(ref.state_dict())
        _MODULES[key] = (ref, fused)
    return _MODULES[key]


def _sdpa_fn(ref, provider):
    attend = sdpa_providers.attention(provider)

    def fn(x):
        b, c, h, w = x.shape
        q = sdpa_providers.user_layout(ref.query_conv(x))  # (B, 1, N, d), contiguous
        k = sdpa_providers.user_layout(ref.key_conv(x))
        v = sdpa_providers.user_layout(ref.value_conv(x))  # (B, 1, N, C)
        o = attend(q, k, v, 1.0)
        return ref.gamma * o.squeeze(1).transpose(1, 2).reshape(b, c, h, w) + x

    return fn


def sdpa_backend(provider, ref, x):
    """The SDPA backend a provider runs on the conv outputs of ``x``."""
    with torch.no_grad():
        q, k, v = (sdpa_providers.user_layout(conv(x)) for conv in (ref.query_conv, ref.key_conv, ref.value_conv))
    return sdpa_providers.backend_of(provider, q, k, v, 1.0)


def provider_fn(name, ref, fused):
    if name == "eager":
        return lambda x: ref(x)[0]
    if name in sdpa_providers.PROVIDERS:
        return _sdpa_fn(ref, name)
    return fused


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda s: "x".join(map(str, s)))
def test_self_attention(benchmark, monkeypatch, case, dtype, provider, mode):
    b, c, h, w = case
    monkeypatch.setenv("ATTNFAST_BACKEND", "torch" if provider == "chunked" else "auto")
    ref, fused = _modules(c, dtype)
    fn = provider_fn(provider, ref, fused)
    x = torch.randn(case, device=harness.device(), dtype=dtype, requires_grad=True)
    n = h * w
    d = max(c // 8, 1)
    pairs = b * n * n
    # FLOPs of the attention itself: q^T k (2 d per pair) and P v (2 C per pair); backward ~2.5x.
    flops_fwd = pairs * (2 * d + 2 * c)
    flops = {"fwd": flops_fwd, "bwd": int(2.5 * flops_fwd), "fwd+bwd": int(3.5 * flops_fwd)}[mode]
    benchmark.group = f"self_attention B={b} C={c} {h}x{w} {dtype} {mode}"
    extra = {}
    if provider in sdpa_providers.PROVIDERS:
        extra["sdpa_backend"] = sdpa_backend(provider, ref, x)
    try:
        harness.measure(benchmark, fn, [x], mode, op="self_attention", provider=provider, shape=str(case),
                        dtype=str(dtype), n=n, pairs=pairs, exps=pairs * (1 if mode == "fwd" else 2),
                        flops=flops, backend=os.environ.get("ATTNFAST_BACKEND"), **extra)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} out of memory at {case} {dtype}")
