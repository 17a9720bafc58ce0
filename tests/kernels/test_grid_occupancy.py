"""Grid attention's split counts come from the real occupancy of the compiled kernels.

The launchers split H*W (and, for the weight kernel, B*H*W) into ``nsplit`` ranges so that one wave
of programs fills every SM: ``sm_count * resident blocks per SM``. On CUDA the resident blocks are
read from the compiled kernel (registers, shared memory, warps) through ``blocks_per_sm``; here the
AOT compile for sm_90 stands in for it, at the benchmark shapes (AttnVGG pool-3/pool-4 at 224 and
512, B = 8..64, A = 256). The compile runs in a subprocess without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import triton

from attnfast.kernels import grid_attention as G
from attnfast.kernels._launch import blocks_per_sm

H100_SMS = 132  # H100 SXM and H200: 132 SMs
A = 256
# (name, C_l, H=W) of the AttnVGG benchmark blocks (benchmarks/test_bench_grid_attention.py)
SHAPES = [("pool3@224", 256, 28), ("pool3@512", 256, 64), ("pool4@224", 512, 14), ("pool4@512", 512, 32)]
BATCHES = (8, 16, 32, 64)
DTYPES = (torch.bfloat16, torch.float32)

_SCRIPT = r"""
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from attnfast.kernels import grid_attention as G
from attnfast.kernels.registry import compile_config
wanted = json.loads(sys.argv[1])
configs = {c.name: c for c in G.aot_configs()}
out = {}
for name in wanted:
    cfg = configs[name]
    r = compile_config(cfg, 90)
    src = triton.compiler.ASTSource(fn=cfg.kernel, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm["ptx"]
    atoms = [line.strip() for line in ptx.splitlines() if "atom." in line or "red." in line]
    r["atomics"] = atoms
    out[name] = r
print(json.dumps(out))
"""


def _configs_at_a256():
    names = {}
    for dtype in DTYPES:
        prec = "ieee"
        for kind in ("fwd", "bwd"):
            names[(kind, dtype)] = G._main_config(kind, dtype, prec, G.main_blocks(A, dtype, kind == "bwd")).name
        for _, C, _ in SHAPES:
            names[("bwd_weight", dtype, C)] = G._weight_config(dtype, prec, G.weight_blocks(C, dtype, prec)).name
    return names


@pytest.fixture(scope="module")
def sm90():
    """{config name: compile result for sm_90} for every config the benchmark shapes launch."""
    names = sorted(set(_configs_at_a256().values()))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(names)], capture_output=True, text=True,
                       env=env, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _fake_compiled(res):
    """What the launcher reads from a loaded CompiledKernel, filled from the AOT compile."""
    return types.SimpleNamespace(n_regs=res["regs"], metadata=types.SimpleNamespace(
        shared=res["shared_bytes"], num_warps=res["num_warps"]))


def _launch_shape(kind, dtype, C, HW, B):
    """(n_tiles, n_outer, max_splits) as the launcher passes them to the split logic."""
    if kind == "bwd_weight":
        cfg = G.weight_blocks(C, dtype)
        n_outer = triton.cdiv(A, cfg["BLOCK_A2"]) * triton.cdiv(C, cfg["BLOCK_C2"])
        return B * triton.cdiv(HW, cfg["BLOCK_P"]), n_outer, None
    cfg = G.main_blocks(A, dtype, backward=kind == "bwd")
    return triton.cdiv(HW, cfg["BLOCK_P"]), B, G.BLOCK_S if kind == "fwd" else None


@pytest.mark.slow
def test_split_logic_counts_the_resident_blocks_of_the_compiled_kernels(sm90):
    names = _configs_at_a256()
    for (kind, dtype, *rest), name in names.items():
        res = sm90[name]
        expected = blocks_per_sm(res["regs"], res["shared_bytes"], res["num_warps"], 90)
        assert expected >= 1, f"{name}: cannot launch on sm_90 ({res})"
        assert G.resident_blocks(res["regs"], res["shared_bytes"], res["num_warps"], 90) == expected, name
        assert G.compiled_resident_blocks(_fake_compiled(res), 90) == expected, name
        for shape, C, side in SHAPES:
            if kind == "bwd_weight" and rest[0] != C:
                continue
            for B in BATCHES:
                n_tiles, n_outer, cap = _launch_shape(kind, dtype, C, side * side, B)
                nsplit, per = G.splits_for(n_tiles, n_outer, H100_SMS, expected, cap)
                where = f"{name} at {shape} B={B}: {n_outer} x {nsplit} programs, {expected}/SM"
                assert (nsplit - 1) * per < n_tiles <= nsplit * per, where  # every split has tiles
                # no split count (up to the cap) is faster in the wave model at this occupancy
                slots = H100_SMS * expected
                most = min(n_tiles, cap or n_tiles)
                best = min(G.split_time(n_tiles, n_outer, slots, k) for k in range(1, most + 1))
                assert G.split_time(n_tiles, n_outer, slots, nsplit) == best, where


@pytest.mark.slow
def test_relaxed_atomics_in_the_backward(sm90):
    """The dGp scatter's atomics are relaxed: no acq_rel/acquire/release ordering (a GPU-wide fence
    each) in the pixel loop."""
    for (kind, dtype, *_), name in _configs_at_a256().items():
        atoms = sm90[name]["atomics"]
        if kind == "bwd":
            assert atoms, f"{name}: expected the dGp atomics in the PTX"
        ordered = [a for a in atoms if any(s in a for s in (".acq_rel", ".acquire", ".release", ".sc."))]
        assert not ordered, f"{name}: ordered atomics {ordered[:3]}"


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


def test_cuda_split_count_uses_the_compiled_kernel(monkeypatch):
    """On CUDA: the kernel is compiled ahead of the launch (``warmup``), its resident blocks computed
    from the loaded kernel's registers / shared memory / warps, cached per config and device."""
    calls = []

    class FakeKernel:
        fn = types.SimpleNamespace(__name__="fake_kernel")

        def warmup(self, *args, grid, **kw):
            calls.append((args, grid, kw))
            return types.SimpleNamespace(n_regs=168, metadata=types.SimpleNamespace(shared=5120, num_warps=8))

    monkeypatch.setattr(G, "_RESIDENT", {})
    monkeypatch.setattr(G, "compute_capability", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(multi_processor_count=H100_SMS))
    args = (torch.empty(1, dtype=torch.bfloat16), 7)
    kw = {"BLOCK_P": 16, "num_warps": 8}
    cuda1 = torch.device("cuda", 1)
    resident = blocks_per_sm(168, 5120, 8, 90)
    assert resident == 1  # 168 registers x 256 threads: one block per SM
    assert G._splits(FakeKernel(), args, kw, 196, 8, cuda1) == G.splits_for(196, 8, H100_SMS, resident)
    assert G._splits(FakeKernel(), args, kw, 64, 16, cuda1) == G.splits_for(64, 16, H100_SMS, resident)
    assert len(calls) == 1, "the occupancy is read once per config and device"
    assert calls[0][1] == (1,) and calls[0][2] == kw
    G._splits(FakeKernel(), args, kw, 196, 8, torch.device("cuda", 0))
    assert len(calls) == 2, "another device compiles and reads its own"


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
