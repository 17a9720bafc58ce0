"""CBAM's passes split the pixels from the real occupancy of their compiled kernel on CUDA (``_launch.splits``),
as grid attention does: the kernel is compiled ahead (``warmup``, with a placeholder plan), its resident blocks
per SM read from registers / shared memory / warps, and the split count is ``splits_for``'s."""
import types

import torch
import triton

from attnfast.kernels import _launch as L
from attnfast.kernels import cbam as K

SMS = 132


class _FakeKernel:
    fn = types.SimpleNamespace(__name__="fake_cbam_kernel")

    def __init__(self, calls, regs):
        self.calls, self.regs = calls, regs

    def warmup(self, *args, grid, **kw):
        self.calls.append((args, kw))
        return types.SimpleNamespace(n_regs=self.regs, metadata=types.SimpleNamespace(shared=0, num_warps=kw["num_warps"]))


def test_plan_on_cuda_uses_the_compiled_kernels_occupancy(monkeypatch):
    monkeypatch.setattr(L, "RESIDENT", {})
    monkeypatch.setattr(L, "compute_capability", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(multi_processor_count=SMS))
    x = types.SimpleNamespace(shape=(32, 256, 56, 56), device=torch.device("cuda", 0))
    seen = []

    def args(pl):
        seen.append((pl["S"], pl["TILES"]))
        return (torch.empty(1), pl["C"], pl["P"], pl["TILES"], pl["S"])

    for regs in (32, 255):
        L.RESIDENT.clear()  # the same fake binary: the cache would answer with the first one's occupancy
        calls = []
        pl = K.plan(x, _FakeKernel(calls, regs), args)
        resident = L.blocks_per_sm(regs, 0, K.NUM_WARPS, 90)
        n_tiles = triton.cdiv(56 * 56, pl["BLOCK_P"])
        assert (pl["S"], pl["TILES"]) == L.splits_for(n_tiles, 32 * pl["NCB"], SMS, resident)
        assert len(calls) == 1 and calls[0][1]["num_warps"] == K.NUM_WARPS
        assert seen[-1] == (2, 2), "the warm-up compiles with the placeholder plan"
        assert pl["S"] * pl["TILES"] >= n_tiles > (pl["S"] - 1) * pl["TILES"]
    assert resident == 2  # 255 registers x 128 threads: two blocks per SM (32 registers: 16), fewer programs a wave


def test_interpreter_plan_is_a_few_splits():
    x = torch.empty(2, 20, 30, 30, device="meta")
    pl = K.plan(x)
    assert (pl["S"], pl["TILES"]) == L.splits_for(triton.cdiv(900, pl["BLOCK_P"]), 2 * pl["NCB"], L.INTERPRETER_PROGRAMS, 1)
