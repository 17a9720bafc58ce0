"""Grid attention's split counts come from the real occupancy of the compiled kernels.

The launchers split H*W (and, for the weight kernel, B*H*W) into ``nsplit`` ranges so that one wave
of programs fills every SM: ``sm_count * resident blocks per SM``. On CUDA the resident blocks are
read from the compiled kernel (registers, shared memory, warps) through ``blocks_per_sm``; here the
session's AOT run stands in for it with the binaries the benchmark launches really run (captured and
specialized as Triton specializes them at launch: ``benchmarks/aot_launches.py``), for sm_80 and
sm_90, at the benchmark shapes (AttnVGG pool-3/pool-4 at 224 and 512, B = 8 and 64, A = 256).
"""
import types

import torch
import triton

from attnfast.kernels import grid_attention as G
from attnfast.kernels._launch import blocks_per_sm

H100_SMS = 132  # H100 SXM and H200: 132 SMs
SMS = {90: H100_SMS, 80: 108}
A = 256
GRID_SHAPES = {"pool3@224": (256, 28), "pool3@512": (256, 64), "pool4@224": (512, 14), "pool4@512": (512, 32)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fake_compiled(res):
    """What the launcher reads from a loaded CompiledKernel, filled from the AOT compile."""
    return types.SimpleNamespace(n_regs=res["regs"], metadata=types.SimpleNamespace(
        shared=res["dynamic_shared_bytes"], num_warps=res["num_warps"]))


def _launch_shape(kind, dtype, prec, C, HW, B):
    """(n_tiles, n_outer, max_splits) as the launcher passes them to the split logic."""
    if kind == "bwd_weight":
        cfg = G.weight_blocks(C, dtype, prec)
        n_outer = triton.cdiv(A, cfg["BLOCK_A2"]) * triton.cdiv(C, cfg["BLOCK_C2"])
        return B * triton.cdiv(HW, cfg["BLOCK_P"]), n_outer, None
    cfg = G.main_blocks(A, dtype, backward=kind == "bwd")
    return triton.cdiv(HW, cfg["BLOCK_P"]), B, G.BLOCK_S if kind == "fwd" else None


def _grid_launches(launch_results):
    """(binary name, cap, result, kind, label, n_tiles, n_outer, max_splits) of every captured grid
    launch at the benchmark shapes, as the launcher hands it to the split logic."""
    for (name, cap), res in sorted(launch_results.items()):
        module, kind = res["base"].split("[")[0].split(".")
        if module != "grid_attention" or kind not in ("fwd", "bwd", "bwd_weight"):
            continue
        prec = "tf32" if ",tf32" in res["base"] else "ieee"
        for label in res["launches"]:
            _, shape, batch, dt, *_ = label.split()
            C, side = GRID_SHAPES[shape]
            yield (name, cap, res, kind, label, *_launch_shape(kind, DTYPES[dt], prec, C, side * side, int(batch[2:])))


def test_split_logic_counts_the_resident_blocks_of_the_launch_binaries(launch_results):
    """For every grid launch binary at the benchmark shapes: the split logic's resident blocks (from
    what the launcher reads off the loaded kernel) are the binary's blocks/SM, and the split count it
    picks is the fastest in its wave model at that occupancy."""
    kinds = set()
    for name, cap, res, kind, label, n_tiles, n_outer, most in _grid_launches(launch_results):
        expected = blocks_per_sm(res["regs"], res["shared_bytes"], res["num_warps"], cap)
        assert expected >= 1, f"{name}: cannot launch on sm_{cap} ({res})"
        assert expected == res["blocks_per_sm"], name
        assert G.compiled_resident_blocks(_fake_compiled(res), cap) == G.resident_blocks(
            res["regs"], res["dynamic_shared_bytes"], res["num_warps"], cap), name
        nsplit, per = G.splits_for(n_tiles, n_outer, SMS[cap], expected, most)
        where = f"{name} sm_{cap} at {label}: {n_outer} x {nsplit} programs, {expected}/SM"
        assert (nsplit - 1) * per < n_tiles <= nsplit * per, where  # every split has tiles
        slots = SMS[cap] * expected
        best = min(G.split_time(n_tiles, n_outer, slots, k) for k in range(1, min(n_tiles, most or n_tiles) + 1))
        assert G.split_time(n_tiles, n_outer, slots, nsplit) == best, where
        kinds.add(kind)
    assert kinds == {"fwd", "bwd", "bwd_weight"}, f"grid launch binaries missing: {kinds}"


def test_grid_occupancy_at_the_benchmark_shapes(launch_results):
    """At AttnVGG's shapes (pool-3/pool-4 at 224 and 512, A=256, B=8 and 64, NCHW and channels_last)
    on an H100 (sm_90, 132 SMs) and an A100 (sm_80, 108 SMs), with the binary each launch runs (its
    captured launch binary, specialized as Triton specializes it): the programs launched fill
    ``SMs x blocks/SM``, or the split logic assumed exactly those blocks/SM (so it knows why it
    launches fewer: not enough tiles, or the cap on splits).

    The split logic's assumption is ``grid_attention.resident_blocks`` of what the launcher reads from
    the loaded kernel (registers, Triton's ``metadata.shared``, warps); ``splits_for`` turns it into
    the split count."""
    bad, checked = [], 0
    for name, cap, r, _, label, n_tiles, n_outer, most in _grid_launches(launch_results):
        assumed = G.resident_blocks(r["regs"], r["dynamic_shared_bytes"], r["num_warps"], cap)
        nsplit, _ = G.splits_for(n_tiles, n_outer, SMS[cap], assumed, most)
        programs, slots = n_outer * nsplit, SMS[cap] * r["blocks_per_sm"]
        checked += 1
        if programs < slots and assumed != r["blocks_per_sm"]:
            bad.append(f"sm_{cap} {label} {name}: {programs} programs < {SMS[cap]} SMs x {r['blocks_per_sm']} "
                       f"blocks/SM, split logic assumed {assumed}/SM")
    assert checked, "no launch checked"
    assert not bad, "SMs left idle without the split logic knowing:\n" + "\n".join(bad)


def test_splits_for_fills_one_wave():
    # 132 SMs x 1 block, 8 samples of 49 tiles: 13 splits of 4 tiles (104 programs, one wave) beat
    # 17 splits of 3 (136 programs: a second wave of 4 makes it 6 tile-times)
    assert G.splits_for(n_tiles=49, n_outer=8, sm_count=132, resident_per_sm=1) == (13, 4)
    # 64 samples: 2 splits (128 programs, one wave) rather than 3 (192: two waves)
    assert G.splits_for(n_tiles=49, n_outer=64, sm_count=132, resident_per_sm=1) == (2, 25)
    # two resident blocks per SM: twice the programs in one wave
    assert G.splits_for(n_tiles=256, n_outer=8, sm_count=132, resident_per_sm=1) == (16, 16)
    assert G.splits_for(n_tiles=256, n_outer=8, sm_count=132, resident_per_sm=2) == (32, 8)
    # the cap and the tile count bound it; every split gets tiles
    assert G.splits_for(n_tiles=1000, n_outer=1, sm_count=132, resident_per_sm=4, max_splits=64) == (63, 16)
    assert G.splits_for(n_tiles=3, n_outer=1, sm_count=132, resident_per_sm=1) == (3, 1)
    assert G.splits_for(n_tiles=1, n_outer=64, sm_count=132, resident_per_sm=1) == (1, 1)
    # a batch that fills the device alone: one split
    assert G.splits_for(n_tiles=49, n_outer=512, sm_count=132, resident_per_sm=1) == (1, 49)


def test_split_time_model():
    # 8 rows x 49 tiles in 13 splits of 4: 104 programs, one wave of 132: 4 tiles + 1 overhead
    assert G.split_time(49, 8, 132, 13) == 1 * (4 + G.PROGRAM_OVERHEAD_TILES)
    # 17 splits of 3: 136 programs, two waves
    assert G.split_time(49, 8, 132, 17) == 2 * (3 + G.PROGRAM_OVERHEAD_TILES)
    # 49 splits of 1: 392 programs, three waves
    assert G.split_time(49, 8, 132, 49) == 3 * (1 + G.PROGRAM_OVERHEAD_TILES)


def test_interpreter_keeps_a_few_splits():
    cpu = torch.device("cpu")
    assert G._splits(None, (), {}, 100, 2, cpu) == G.splits_for(100, 2, G.INTERPRETER_PROGRAMS, 1)
    assert G._splits(None, (), {}, 100, 2, cpu)[0] == 4


class _FakeKernel:
    """Counts ``warmup`` compiles; every compile reports 168 registers, 5 KiB shared, 8 warps."""

    fn = types.SimpleNamespace(__name__="fake_kernel")

    def __init__(self, calls):
        self.calls = calls

    def warmup(self, *args, grid, **kw):
        self.calls.append((args, grid, kw))
        return types.SimpleNamespace(n_regs=168, metadata=types.SimpleNamespace(shared=5120, num_warps=8))


def _fake_cuda(monkeypatch):
    monkeypatch.setattr(G, "_RESIDENT", {})
    monkeypatch.setattr(G, "compute_capability", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(multi_processor_count=H100_SMS))


def test_cuda_split_count_uses_the_compiled_kernel(monkeypatch):
    """On CUDA: the kernel is compiled ahead of the launch (``warmup``), its resident blocks computed
    from the loaded kernel's registers / shared memory / warps, cached per config and device."""
    calls = []
    _fake_cuda(monkeypatch)
    args = (torch.empty(1, dtype=torch.bfloat16), 7)
    kw = {"BLOCK_P": 16, "num_warps": 8}
    cuda1 = torch.device("cuda", 1)
    resident = blocks_per_sm(168, 5120, 8, 90)
    assert resident == 1  # 168 registers x 256 threads: one block per SM
    assert G._splits(_FakeKernel(calls), args, kw, 196, 8, cuda1) == G.splits_for(196, 8, H100_SMS, resident)
    assert G._splits(_FakeKernel(calls), args, kw, 64, 16, cuda1) == G.splits_for(64, 16, H100_SMS, resident)
    assert len(calls) == 1, "the occupancy is read once per config and device"
    assert calls[0][1] == (1,) and calls[0][2] == kw
    G._splits(_FakeKernel(calls), args, kw, 196, 8, torch.device("cuda", 0))
    assert len(calls) == 2, "another device compiles and reads its own"


def test_occupancy_cache_is_keyed_by_the_launch_specialization(monkeypatch):
    """NCHW and channels_last inputs compile different binaries (Triton specializes strides equal to 1
    and divisible by 16, and 16-byte aligned pointers): each layout reads its own occupancy, so the
    split count (and the summation order) does not depend on which layout ran first."""
    calls = []
    _fake_cuda(monkeypatch)
    cuda = torch.device("cuda", 0)
    kw = {"BLOCK_P": 16, "num_warps": 8}
    x = torch.empty(2, 32, 6, 6)
    nchw, cl = x, x.contiguous(memory_format=torch.channels_last)
    for t in (nchw, cl, nchw, cl):
        G._splits(_FakeKernel(calls), (t, *t.stride()), kw, 100, 2, cuda)
    assert len(calls) == 2, "one occupancy read per layout"
    G._splits(_FakeKernel(calls), (x[:, :, :, 1:], *x[:, :, :, 1:].stride()), kw, 100, 2, cuda)
    assert len(calls) == 3, "a pointer off 16-byte alignment compiles another binary"
    G._splits(_FakeKernel(calls), (torch.empty(2, 32, 6, 6), 1152, 36, 6, 1), kw, 100, 2, cuda)
    assert len(calls) == 3, "the same specialization (another tensor, same layout) hits the cache"


def test_split_arguments_are_not_specialized():
    """The split arguments do not enter the JIT's specialization: the warmup with placeholder split
    values compiles exactly the kernel that the launch then runs."""
    for kernel, names in ((G.grid_fwd_kernel, {"tiles_per_split", "nsplit"}),
                          (G.grid_bwd_kernel, {"tiles_per_split", "nsplit"}),
                          (G.grid_bwd_weight_kernel, {"tiles_per_split"})):
        # a JITFunction has it as an attribute; the interpreter's InterpretedFunction in its kwargs
        dns = set(getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get(
            "do_not_specialize") or ())
        arg_names = list(getattr(kernel, "arg_names", []))
        resolved = {arg_names[i] if isinstance(i, int) else i for i in dns}
        assert names <= resolved, (kernel, resolved)
