"""PyTorch's own attention kernels called the way users call them: the baselines of the self-attention
benchmarks.

Users hand ``F.scaled_dot_product_attention`` contiguous ``(B, heads, N, d)`` tensors. The fused
backends (flash, memory-efficient, cuDNN) need a unit stride on the last dimension. A transposed
view of a conv output has stride N there, so it rules them all out: that is how the old baseline
ended up on the math path on CPU and with "No available kernel" on GPU.

Providers, each named after the path it runs:

- ``sdpa_default``: the default dispatch on that layout. With SAGAN's d_qk = C/8 != d_v = C, flash
  cannot run (it needs equal head dims). The CPU then takes the math path; CUDA takes
  memory-efficient or cuDNN. ``default_backend`` names the backend it chose, and ``profiled_ops``
  the attention ops a call really ran.
- ``sdpa_mem_efficient``: ``sdpa_kernel([EFFICIENT_ATTENTION])``: only the memory-efficient kernel,
  which takes d_qk != d_v (its q and k dims must match, v's may differ). SDPA raises rather than fall
  back; there is no such kernel on a CPU ("No available kernel").
- ``sdpa_flash_padded``: q and k zero-padded from d_qk to d_v (zero columns leave q^T k unchanged),
  under ``sdpa_kernel([FLASH_ATTENTION])``. That allows only flash, and SDPA raises rather than
  fall back, so a number from this provider is always the flash kernel (CPU and CUDA).
- ``flex``: ``torch.nn.attention.flex_attention`` through ``harness.compiled`` (FlexAttention is only
  fast compiled; its compiled kernels take d_qk != d_v). Each input shape compiles once, and the
  result records that the compiled graph ran. FlexAttention has no backward on a CPU, where it
  refuses inputs that require grad.

SAGAN's logit scale is 1 (no 1/sqrt(d)). It is passed explicitly as ``scale=1.0``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PROVIDERS = ("sdpa_default", "sdpa_mem_efficient", "sdpa_flash_padded", "flex")
# the aten ops that name each SDPA backend, as the profiler records them
BACKEND_OPS = {
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_efficient_attention_forward": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION",
    "aten::_flash_attention_forward": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
    "aten::_scaled_dot_product_fused_attention_overrideable": "OVERRIDEABLE",
}


def user_layout(t: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """A conv output ``(B, heads * d, H, W)`` or ``(B, heads * d, N)`` as SDPA's contiguous
    ``(B, heads, N, d)``: the copy a user's ``.transpose(...).contiguous()`` makes."""
    b, c = t.shape[:2]
    return t.reshape(b, heads, c // heads, -1).transpose(-1, -2).contiguous()


def default_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> str:
    """Name of the backend SDPA's default dispatch picks for these inputs (``MATH``,
    ``FLASH_ATTENTION``, ``EFFICIENT_ATTENTION``, ``CUDNN_ATTENTION``, ...)."""
    return SDPBackend(torch._fused_sdp_choice(q, k, v, scale=scale)).name


def sdpa_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def sdpa_mem_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def sdpa_flash_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    pad = v.shape[-1] - q.shape[-1]
    if pad < 0:
        raise ValueError(f"sdpa_flash_padded pads q/k up to d_v; got d_qk={q.shape[-1]} > d_v={v.shape[-1]}")
    if pad:
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _flex_core(q, k, v, scale):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, scale=scale)


def flex():
    """Compiled FlexAttention ``(q, k, v, scale) -> o`` (one ``harness.compiled``, shared by all callers)."""
    import harness

    return harness.compiled(_flex_core)


def attention(provider: str):
    """The attention function ``(q, k, v, scale) -> o`` of a provider, all in ``(B, heads, N, d)``."""
    table = {"sdpa_default": sdpa_default, "sdpa_mem_efficient": sdpa_mem_efficient,
             "sdpa_flash_padded": sdpa_flash_padded}
    if provider == "flex":
        return flex()
    if provider not in table:
        raise ValueError(f"provider must be one of {PROVIDERS}; got {provider!r}")
    return table[provider]


def backend_of(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> str:
    """The backend a provider is bound to for these inputs (the forced ones run it or raise)."""
    if provider == "sdpa_flash_padded":
        return SDPBackend.FLASH_ATTENTION.name
    if provider == "sdpa_mem_efficient":
        return SDPBackend.EFFICIENT_ATTENTION.name
    if provider == "flex":
        return "FLEX_ATTENTION"
    attention(provider)
    return default_backend(q, k, v, scale)


def profiled_ops(fn) -> dict:
    """Run ``fn()`` once under the profiler (CPU activity: the aten ops, on any device) and return the
    SDPA backends its ops name (``BACKEND_OPS``) with every attention-related op it recorded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted({e.key for e in prof.key_averages()
                  if "attention" in e.key or e.key in BACKEND_OPS or "flex" in e.key})
    return {"backends": sorted({BACKEND_OPS[o] for o in ops if o in BACKEND_OPS}), "ops": ops}
