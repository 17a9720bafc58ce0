"""Launch helpers shared by every kernel module: the device guard and the occupancy model.

- ``on_device(t)``: a context that makes ``t``'s CUDA device current for the launch, so a tensor on
  ``cuda:1`` runs there even when the current device is ``cuda:0`` (Triton launches on the current
  device and would otherwise read foreign memory or fail). A no-op for CPU tensors (interpreter).
- ``blocks_per_sm(regs, shared_bytes, num_warps, cap)``: how many blocks of one compiled kernel fit on
  one streaming multiprocessor at once, from the limits of the compute capability (registers per SM
  with the allocation granularity, shared memory per SM, warps per SM, blocks per SM). The AOT
  tooling (``attnfast.kernels.aot``) reports it for every compiled binary, and the launchers size
  their splits with it.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch


def on_device(t: torch.Tensor):
    """Context manager: ``t``'s CUDA device is current inside (no-op off CUDA)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class SMLimits:
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    regs_per_block: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256 (8 per thread)
    sub_partitions: int = 4  # each holds regs_per_sm / 4 registers
    max_warps: int = 64
    max_blocks: int = 32
    shared_per_sm: int = 228 * 1024  # bytes the SM has for blocks (1 KiB of it is reserved per block)
    shared_reserved_per_block: int = 1024
    shared_alloc_unit: int = 128


# CUDA occupancy tables (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
SM_LIMITS = {
    80: SMLimits(shared_per_sm=164 * 1024),
    86: SMLimits(max_warps=48, max_blocks=16, shared_per_sm=100 * 1024),
    89: SMLimits(max_warps=48, max_blocks=24, shared_per_sm=100 * 1024),
    90: SMLimits(shared_per_sm=228 * 1024),
}


def blocks_per_sm(regs: int, shared_bytes: int, num_warps: int, cap: int) -> int:
    """Resident blocks per SM for a kernel using ``regs`` registers per thread, ``shared_bytes`` of
    shared memory per block and ``num_warps`` warps (0 when it cannot launch at all)."""
    known = [c for c in SM_LIMITS if c <= cap]
    lim = SM_LIMITS[max(known)] if known else SM_LIMITS[80]
    if regs > lim.max_regs_per_thread or num_warps > lim.max_warps:
        return 0
    regs_per_warp = -(-max(regs, 1) * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    if regs_per_warp * num_warps > lim.regs_per_block:
        return 0
    # The register file is split between the SM's sub-partitions (warp schedulers); a warp's registers
    # come from one of them, so whole warps must fit per sub-partition (cuda_occupancy.h).
    warps_by_regs = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp * lim.sub_partitions
    by_regs = warps_by_regs // num_warps
    by_warps = lim.max_warps // num_warps
    if shared_bytes:
        alloc = -(-shared_bytes // lim.shared_alloc_unit) * lim.shared_alloc_unit
        by_smem = lim.shared_per_sm // (alloc + lim.shared_reserved_per_block)
    else:
        by_smem = lim.max_blocks
    return max(0, min(by_regs, by_warps, by_smem, lim.max_blocks))


def compute_capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
