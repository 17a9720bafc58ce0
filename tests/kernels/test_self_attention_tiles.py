"""Self-attention tiles: every warp owns its rows, launches use exactly the registered configurations,
launches run under the tensor's device, and 16-bit kernels up to D = 32 spill nothing.

The PTX-level evidence (wgmma on sm_90, MMA count per warp against the TTGIR layout) is read from the
session's AOT report in ``test_ptx_evidence.py``; here are the tile rules it rests on, checked without
compiling, and the spill rule, read from the same report.
"""
import contextlib

import pytest
import torch

from attnfast.kernels import self_attention as S

KINDS = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel", "rowsum": "_bwd_rowsum_kernel"}
MMA_KERNELS = ("self_attention.fwd[", "self_attention.bwd_dq[", "self_attention.bwd_dkdv[")
CONFIGS = S.aot_configs()  # before any test swaps the kernels for recorders


def _configs(prefixes=MMA_KERNELS):
    return [c for c in CONFIGS if c.name.startswith(prefixes)]


def _rows(cfg) -> int:
    """Rows of a program's dots: queries for the forward and dQ, keys for dK/dV."""
    return cfg.constexprs["BLOCK_N" if "bwd_dkdv" in cfg.name else "BLOCK_M"]


def _dot_shapes(cfg) -> list:
    """(M, N) of every dot the kernel issues (M: the program's rows)."""
    ce = cfg.constexprs
    m, n, d, dv, c = ce["BLOCK_M"], ce["BLOCK_N"], ce["BLOCK_D"], ce["BLOCK_DV"], ce.get("BLOCK_C")
    if "fwd[" in cfg.name:
        return [(m, n), (m, dv)]
    if "bwd_dq[" in cfg.name:
        return [(m, n), (m, n), (m, d)]  # S = Q K^T, dP = dO V^T (K: DV or BLOCK_C chunks), dQ += dS K
    return [(n, m), (n, dv), (n, m), (n, d)]  # S^T, dV += P^T dO, dP^T (K: DV or BLOCK_C), dK += dS^T Q


def test_16bit_programs_give_every_warp_its_own_16_rows():
    """Tensor-core tiles: the rows of a program are a multiple of 16 per warp (mma.sync m16 on sm_80)
    and of 64 per warpgroup of 4 warps (wgmma m64 on sm_90), so no warp computes another's rows."""
    bad = []
    for cfg in _configs():
        if "[fp32" in cfg.name:
            continue
        rows, warps = _rows(cfg), cfg.num_warps
        if warps % 4 or rows % (16 * warps) or rows % (64 * (warps // 4)):
            bad.append(f"{cfg.name}: {rows} rows on {warps} warps")
    assert not bad, bad


def test_fp32_dots_have_an_element_for_every_thread():
    """fp32 runs FMA dots on blocked layouts: a dot output smaller than the block's threads would make
    threads hold copies of each other's elements (the TTGIR shows each element in one thread at these
    tiles; this keeps the tiles from shrinking below that)."""
    bad = []
    for cfg in _configs():
        if "[fp32" not in cfg.name:
            continue
        for m, n in _dot_shapes(cfg):
            if m * n < 32 * cfg.num_warps:
                bad.append(f"{cfg.name}: {m}x{n} dot on {32 * cfg.num_warps} threads")
    assert not bad, bad


def test_split_value_channels_contract_dp_in_chunks():
    """With more value channels than one tile (ONE_DV False) dP is summed over BLOCK_C-channel chunks
    that divide the value tile; with one tile the whole tile is one chunk."""
    for cfg in _configs(("self_attention.bwd_dq[", "self_attention.bwd_dkdv[")):
        ce = cfg.constexprs
        if ce["ONE_DV"]:
            assert ce["BLOCK_C"] == ce["BLOCK_DV"], cfg.name
        else:
            assert 16 <= ce["BLOCK_C"] < ce["BLOCK_DV"] and ce["BLOCK_DV"] % ce["BLOCK_C"] == 0, cfg.name


class _Recorder:
    """Stands in for a JIT kernel: records each launch's keyword arguments instead of running it."""

    def __init__(self, kind, log, device_stack):
        self.kind, self.log, self.device_stack = kind, log, device_stack

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kind, grid, kwargs, list(self.device_stack)))
        return launch


@pytest.fixture
def recorded(monkeypatch):
    log, stack = [], []
    for kind, attr in KINDS.items():
        monkeypatch.setattr(S, attr, _Recorder(kind, log, stack))

    @contextlib.contextmanager
    def guard(t):
        stack.append(t)
        try:
            yield
        finally:
            stack.pop()

    monkeypatch.setattr(S, "on_device", guard)
    return log


def _launch_all(dtype, d, dv, nq=40, nk=33, b=2):
    q, k = torch.zeros(b, d, nq, dtype=dtype), torch.zeros(b, d, nk, dtype=dtype)
    v, x = torch.zeros(b, dv, nk, dtype=dtype), torch.zeros(b, dv, nq, dtype=dtype)
    gamma = torch.ones(1, dtype=dtype)
    out, o, lse = torch.empty_like(x), torch.empty(b, dv, nq), torch.empty(b, nq)
    S.attention_fwd(q, k, v, x, gamma, 0.5, out, o, lse)
    S.attention_bwd(torch.zeros_like(x), q, k, v, o, lse, gamma, 0.5, torch.empty_like(q), torch.empty_like(k),
                    torch.empty_like(v), torch.empty(b, nq))
    return q


_NAMES = {"fwd": "self_attention.fwd[", "dq": "self_attention.bwd_dq[", "dkdv": "self_attention.bwd_dkdv[",
          "rowsum": "self_attention.bwd_rowsum["}


@pytest.mark.parametrize("dtype", list(S.DTYPES), ids=str)
def test_every_launch_is_a_registered_config_under_the_device_guard(recorded, dtype):
    """Each launch's constexprs, warps and stages are those of one registered config (the AOT
    evidence is about what runs), and every launch happens inside ``on_device(q)``."""
    configs = [c for c in CONFIGS if f"[{S.DTYPES[dtype]}" in c.name]
    for d, dv in [(1, 1), (5, 40), (16, 128), (20, 64), (32, 256), (64, 512), (100, 130), (128, 128), (128, 300)]:
        recorded.clear()
        q = _launch_all(dtype, d, dv)
        assert {kind for kind, *_ in recorded} == set(KINDS), (d, dv)
        for kind, grid, kwargs, guards in recorded:
            guarded = bool(guards) and guards[-1].data_ptr() == q.data_ptr() and guards[-1].device == q.device
            assert guarded, f"{kind} launched outside on_device(q) (d={d}, dv={dv})"
            matches = [c for c in configs if c.name.startswith(_NAMES[kind])
                       and all(kwargs.get(key) == val for key, val in c.constexprs.items())
                       and kwargs.get("num_warps") == c.num_warps and kwargs.get("num_stages") == c.num_stages]
            assert len(matches) == 1, f"{kind} launch (d={d}, dv={dv}) matches {[c.name for c in matches]}: {kwargs}"


def test_16bit_kernels_up_to_d32_spill_nothing(results_by_config):
    """Every fp16/bf16 self-attention kernel with a q/k tile of at most 32 (SAGAN up to C = 256, the
    shipped C = 128 ones, D = 16 and DV = 128, included) spills nothing on sm_80 and sm_90, in every
    binary compiled for it (the benchmark launches' binaries, else the plain build), whatever its
    budget (budgets cover D >= 64 and fp32: ``attnfast.kernels.aot.budgets``)."""
    names = {c.name for c in CONFIGS if "[fp32" not in c.name and c.constexprs.get("BLOCK_D", 0) <= 32
             and c.name.startswith(MMA_KERNELS)}
    assert "self_attention.bwd_dkdv[fp16,D=16,DV=128,one_dv=1]" in names
    assert names <= set(results_by_config), sorted(names - set(results_by_config))
    rows = [r for name in sorted(names) for r in results_by_config[name]]
    assert {r["cap"] for r in rows} == {80, 90}
    assert any(r.get("base") == "self_attention.bwd_dkdv[bf16,D=16,DV=128,one_dv=1]" for r in rows), \
        "the SAGAN C = 128 launch binaries are missing"
    # The one exception is recorded, measured, in the budget table: under triton 3.9.0 (not a CI stack) the 16-bit
    # dK/dV kernels at D <= 32 spill 8 B on sm_90 since their NaN-exact gamma scaling. Every other measured triton
    # (CI's 3.6.0 and 3.8.0 among them) must spill nothing here, and an unmeasured one is held to the same.
    import triton
    from attnfast.kernels.aot.budgets import CAPS, MEASURED_TRITONS, SPILLS
    version = triton.__version__
    exempt = {v for v in MEASURED_TRITONS if any(SPILLS.get(n, {}).get(v, (0, 0)) != (0, 0) for n in names)}
    assert exempt <= {"3.9.0"}, exempt
    def allowed(name, cap):
        return SPILLS.get(name.split("@")[0], {}).get(version, (0, 0))[CAPS.index(cap)] if version in exempt else 0
    spilled = {(r["name"], r["cap"]): r["spill_bytes"] for r in rows if r["spill_bytes"] > allowed(r["name"], r["cap"])}
    assert not spilled, spilled
