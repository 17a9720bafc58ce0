"""Input validation shared by the reference modules and the fused ops.

Every check raises ``ValueError`` with a message saying what was expected, so a bad input
never turns into a silently wrong result or an opaque shape error deep in a kernel.
"""
from __future__ import annotations

import torch

from ._dispatch import autocast_dtype

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(x, name: str, *, ndim: int | None = None, channels: int | None = None,
                 float_only: bool = True) -> None:
    """Validate one input tensor of an attention module."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D tensor (B, C, H, W); got shape {tuple(x.shape)} ({x.dim()}-D)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1); got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64); "
                         f"got {x.dtype}")


def check_feature_map(x, name: str) -> tuple:
    """``x`` a 4-D (B, C, H, W) tensor with at least one sample, channel and pixel, one sample addressable with
    32-bit offsets (the kernels'); returns its shape."""
    check_tensor(x, name, ndim=4)
    B, C, H, W = x.shape
    if B == 0 or C == 0 or H * W == 0:
        raise ValueError(f"{name} must have at least one sample, channel and pixel; got shape {tuple(x.shape)}")
    if C * H * W >= 2 ** 31:
        raise ValueError(f"one sample of {name} must have fewer than 2**31 elements (32-bit offsets in the kernels); "
                         f"got {tuple(x.shape[1:])}")
    return B, C, H, W


def check_same(tensors: dict, *, dtype: bool = True, device: bool = True) -> None:
    """All named tensors share a device (and a dtype)."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if device and t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; "
                             "all inputs must be on the same device")
        if dtype and t.dtype != t0.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {name0} has {t0.dtype}; "
                             "all inputs must share one dtype (cast them, or use autocast)")


def check_up_factor(l_shape, g_shape, up_factor: int) -> None:
    """The local map must be exactly ``up_factor`` times the global map in H and W."""
    lh, lw = l_shape[-2:]
    gh, gw = g_shape[-2:]
    if lh != gh * up_factor or lw != gw * up_factor:
        raise ValueError(
            f"l's spatial size {lh}x{lw} must be exactly up_factor={up_factor} times g's {gh}x{gw} "
            f"(expected l to be {gh * up_factor}x{gw * up_factor}, or g to be "
            f"{lh / up_factor:g}x{lw / up_factor:g})")
    if l_shape[0] != g_shape[0]:
        raise ValueError(f"l and g must have the same batch size; got {l_shape[0]} and {g_shape[0]}")


def check_module_inputs(inputs: dict, weight: torch.Tensor, weight_name: str) -> None:
    """Inputs share device and dtype; the module's weight shares their device and, unless autocast is
    on (where the 1x1 convolutions cast both sides), their dtype."""
    check_same(inputs)
    first = next(iter(inputs.values()))
    check_same({**inputs, weight_name: weight}, dtype=autocast_dtype(first.device.type) is None)
