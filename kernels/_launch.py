"""THE launch module shared by every kernel module (``docs/adding-an-op.md``): kernels/<op>.py holds only
``@triton.jit`` kernels and their launchers; everything a launcher needs besides its own tiles is here.

- ``DTYPES``: the one dtype table, torch dtype -> Triton's name, of the storage dtypes the kernels take
  (fp32, fp16, bf16); ``attnfast._dispatch.kernel_eligible`` sends every other dtype to the PyTorch path.
- ``dot_precision(dtype, device, like)``: the one fp32 dot precision policy (below).
- ``splits(kernel, args, kw, n_tiles, n_outer, device, max_splits)``: how many programs split a reduction
  over ``n_tiles`` work tiles, from the real occupancy of the compiled kernel on the device (below).
- ``w2d(weight)``: a 1x1 convolution weight as its (out, in) view.
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
import functools

import torch

# ----------------------------------------------------------------------------------------------
# the dtype table
# ----------------------------------------------------------------------------------------------
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------
# the fp32 dot precision policy
# ----------------------------------------------------------------------------------------------
def _fp32_precision_allows_tf32(levels, legacy) -> bool:
    """The ``fp32_precision`` API where torch has it: the first of ``levels`` (most specific first) whose
    value is not ``"none"`` decides (``"tf32"`` allows TF32; ``"ieee"``, or ``"none"`` all the way up, does
    not). Older torch: ``legacy()``. Never raises: torch's legacy getters raise once the two APIs were mixed,
    and then count as not allowed."""
    try:
        for level in levels:
            value = getattr(level, "fp32_precision", None) if level is not None else None
            if value is None:  # torch without the fp32_precision API
                break
            if value != "none":
                return value == "tf32"
        else:
            return False
    except Exception:  # a getter that raises: fall back to the legacy flag
        pass
    try:
        return bool(legacy())
    except Exception:
        return False


def conv_tf32_allowed() -> bool:
    """Whether eager fp32 convolutions on CUDA (cuDNN) may use TF32 under the current settings:
    ``torch.backends.cudnn.conv.fp32_precision``, then its parents ``torch.backends.cudnn`` and
    ``torch.backends``; older torch: ``torch.backends.cudnn.allow_tf32``."""
    backends = torch.backends
    cudnn = getattr(backends, "cudnn", None)
    return _fp32_precision_allows_tf32((getattr(cudnn, "conv", None), cudnn, backends),
                                       lambda: torch.backends.cudnn.allow_tf32)


def matmul_tf32_allowed() -> bool:
    """Whether eager fp32 matmuls on CUDA (``bmm``, ``@``) may use TF32 under the current settings:
    ``torch.backends.cuda.matmul.fp32_precision``, then ``torch.backends``; older torch:
    ``torch.backends.cuda.matmul.allow_tf32``."""
    backends = torch.backends
    cuda = getattr(backends, "cuda", None)
    return _fp32_precision_allows_tf32((getattr(cuda, "matmul", None), backends),
                                       lambda: torch.backends.cuda.matmul.allow_tf32)


# ``"ieee"``: kernels with IEEE fp32 builds only (self-attention: its fp32 tiles are FMA tiles, and TF32 tiles
# that keep every warp on its own MMA rows are not designed yet), so IEEE whatever torch allows: never less
# accurate than eager.
DOT_KINDS = {"conv": conv_tf32_allowed, "matmul": matmul_tf32_allowed, "ieee": lambda: False}


def dot_precision(dtype: torch.dtype, device: torch.device | str | None = None, like: str = "matmul") -> str:
    """``input_precision`` of a kernel's ``tl.dot`` -- THE fp32 policy of every op: fp32 dots use TF32 exactly
    when the eager operation the kernel replaces would on ``device``: ``like="conv"`` (a 1x1 convolution:
    cuDNN's setting, ``conv_tf32_allowed``; PyTorch's default allows TF32) or ``like="matmul"`` (a ``bmm``:
    the matmul setting, ``matmul_tf32_allowed``; PyTorch's default is IEEE); ``like="ieee"`` for kernels that
    have IEEE fp32 builds only (``DOT_KINDS``). Off CUDA (the interpreter) and
    for 16-bit dtypes (the tensor cores take them as they are; the binaries are the same) it is ``"ieee"``.
    ``device=None``: CUDA if it is available. Read at every launch, as eager reads its flags."""
    if like not in DOT_KINDS:
        raise ValueError(f"like must be one of {', '.join(DOT_KINDS)}; got {like!r}")
    if dtype != torch.float32:
        return "ieee"
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "tf32" if on_cuda and DOT_KINDS[like]() else "ieee"


def dot_precisions(dtype: torch.dtype, like: str = "conv") -> tuple:
    """Every ``dot_precision`` a launch of kind ``like`` can pick for ``dtype`` (what ``aot_configs`` must
    register)."""
    return ("ieee", "tf32") if dtype == torch.float32 and like != "ieee" else ("ieee",)


def w2d(wt: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution weight (out, in, 1, 1) as its (out, in) view (strides kept); 2-D weights as they are.
    Shared by the launchers and the ops' PyTorch paths (this module imports only torch)."""
    return wt[:, :, 0, 0] if wt.dim() == 4 else wt


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


# ----------------------------------------------------------------------------------------------
# splits of work from real occupancy
# ----------------------------------------------------------------------------------------------
INTERPRETER_PROGRAMS = 8  # CPU (interpreter): a few splits so the split/combine path is exercised


PROGRAM_OVERHEAD_TILES = 1  # a program's fixed cost (setup, its partials, the combine's read) in tiles


def split_time(n_tiles: int, n_outer: int, slots: int, nsplit: int) -> int:
    """Modelled time of ``n_outer`` rows of ``n_tiles`` tiles cut into ``nsplit`` equal splits, on
    ``slots`` resident programs: waves x (tiles per split + a program's fixed cost), in tile-times."""
    per = -(-n_tiles // nsplit)
    programs = n_outer * -(-n_tiles // per)
    return -(-programs // slots) * (per + PROGRAM_OVERHEAD_TILES)


@functools.lru_cache(maxsize=4096)
def splits_for(n_tiles: int, n_outer: int, sm_count: int, resident_per_sm: int,
               max_splits: int | None = None) -> tuple:
    """(nsplit, tiles_per_split) for ``n_outer`` independent rows of ``n_tiles`` work tiles each, on
    ``sm_count`` SMs that hold ``resident_per_sm`` blocks of the kernel at once (a wave is
    ``sm_count * resident_per_sm`` programs).

    Every split gets ``tiles_per_split`` tiles (the last one the rest, at least one). The split
    count (up to ``max_splits`` and ``n_tiles``) with the least ``split_time`` wins, the fewest
    splits on ties (less to combine): a batch that fills the device runs unsplit, and a split count
    that would start a second, mostly idle wave is not taken."""
    slots = max(1, sm_count) * max(1, resident_per_sm)
    n_outer = max(1, n_outer)
    most = max(1, min(n_tiles, max_splits or n_tiles))
    best = None
    for want in range(1, most + 1):
        per = -(-n_tiles // want)
        nsplit = -(-n_tiles // per)
        cost = (split_time(n_tiles, n_outer, slots, nsplit), nsplit)
        if best is None or cost < best[0]:
            best = (cost, (nsplit, per))
    return best[1]


def resident_blocks(regs: int, shared_bytes: int, num_warps: int, cap: int) -> int:
    """Blocks of one compiled kernel resident per SM, as the split logic counts them (at least 1:
    a kernel that launched runs one block per SM at a time)."""
    return max(1, blocks_per_sm(regs, shared_bytes, num_warps, cap))


def compiled_resident_blocks(compiled, cap: int) -> int:
    """``resident_blocks`` of a Triton ``CompiledKernel`` (its registers are known once loaded)."""
    if hasattr(compiled, "result"):  # async compile: a future
        compiled = compiled.result()
    if getattr(compiled, "n_regs", None) is None:
        compiled._init_handles()
    return resident_blocks(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, cap)


RESIDENT = {}  # (kernel, device index, argument specialization, constexprs) -> resident blocks per SM


def specialization(args: tuple) -> tuple:
    """What Triton specializes a launch on (``triton/runtime/jit.py``): tensors by dtype and 16-byte
    alignment, integers equal to 1 or divisible by 16; floats are not specialized. Launches with the
    same key run the same binary (NCHW and channels_last strides do not)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            key.append(type(a).__name__)
        else:
            key.append("1" if a == 1 else "D" if a % 16 == 0 else "i")
    return tuple(key)


def resident_per_sm(kernel, device: torch.device, args: tuple, kw: dict, cache: dict | None = None,
                    capability=None) -> int:
    """Resident blocks per SM of ``kernel`` compiled for ``args``/``kw`` on ``device``, compiled
    ahead of the launch with ``warmup`` (no launch; the launch then hits the JIT cache) and cached
    per binary (the arguments' specialization, e.g. the memory layout: ``_specialization``) and
    device. ``args`` carry placeholders for what depends on the split count: those arguments are not
    specialized on (``do_not_specialize``) or are buffers that any fresh allocation matches."""
    cache = RESIDENT if cache is None else cache
    capability = capability or compute_capability
    key = (kernel.fn.__name__, device.index, specialization(args), tuple(sorted(kw.items())))
    hit = cache.get(key)
    if hit is None:
        compiled = kernel.warmup(*args, grid=(1,), **kw)
        hit = cache[key] = compiled_resident_blocks(compiled, capability(device))
    return hit


def splits(kernel, args: tuple, kw: dict, n_tiles: int, n_outer: int, device: torch.device,
           max_splits: int | None = None, *, cache: dict | None = None, capability=None):
    """THE split helper: (nsplit, tiles_per_split) for ``n_outer`` independent rows of ``n_tiles`` work tiles,
    from the real occupancy of ``kernel`` (compiled for ``args``/``kw``: ``resident_per_sm``) on ``device``
    (``splits_for``); the interpreter (CPU) gets a few splits (``INTERPRETER_PROGRAMS``) so the split and
    combine code runs in the tests. Arguments that depend on the split count are placeholders in ``args``:
    buffers any fresh allocation matches, or integers the kernel does not specialize on."""
    if device.type != "cuda":
        return splits_for(n_tiles, n_outer, INTERPRETER_PROGRAMS, 1, max_splits)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return splits_for(n_tiles, n_outer, sms, resident_per_sm(kernel, device, args, kw, cache, capability), max_splits)
