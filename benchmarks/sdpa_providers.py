"""PyTorch SDPA called the way users call it, as the baseline of the self-attention benchmarks.

Users hand ``F.scaled_dot_product_attention`` contiguous ``(B, heads, N, d)`` tensors. The fused
backends (flash, memory-efficient, cuDNN) need a unit stride on the last dimension. A transposed
view of a conv output has stride N there, so it rules them all out: that is how the old baseline
ended up on the math path on CPU and with "No available kernel" on GPU.

Two providers, each named after the SDPA path it runs:

- ``sdpa_default``: the default dispatch on that layout. With SAGAN's d_qk = C/8 != d_v = C, flash
  cannot run (it needs equal head dims). The CPU then takes the math path; CUDA takes
  memory-efficient or cuDNN. ``default_backend`` names the backend it chose.
- ``sdpa_flash_padded``: q and k zero-padded from d_qk to d_v (zero columns leave q^T k unchanged),
  under ``sdpa_kernel([FLASH_ATTENTION])``. That allows only flash, and SDPA raises rather than
  fall back, so a number from this provider is always the flash kernel (CPU and CUDA).

SAGAN's logit scale is 1 (no 1/sqrt(d)). It is passed explicitly as ``scale=1.0``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PROVIDERS = ("sdpa_default", "sdpa_flash_padded")


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


def sdpa_flash_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    pad = v.shape[-1] - q.shape[-1]
    if pad < 0:
        raise ValueError(f"sdpa_flash_padded pads q/k up to d_v; got d_qk={q.shape[-1]} > d_v={v.shape[-1]}")
    if pad:
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(provider: str):
    """The attention function ``(q, k, v, scale) -> o`` of a provider, all in ``(B, heads, N, d)``."""
    if provider == "sdpa_default":
        return sdpa_default
    if provider == "sdpa_flash_padded":
        return sdpa_flash_padded
    raise ValueError(f"provider must be one of {PROVIDERS}; got {provider!r}")


def backend_of(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> str:
    """The backend a provider runs for these inputs (flash-padded: always flash, or it raises)."""
    if provider == "sdpa_flash_padded":
        return SDPBackend.FLASH_ATTENTION.name
    attention(provider)
    return default_backend(q, k, v, scale)
