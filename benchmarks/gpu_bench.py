"""The GPU runs: correctness at real shapes and the comparisons that decide the project's goals, each plan in one
command of at most 8 minutes that writes at most 7 files as it goes. ``benchmarks/gpu_run.sh PLAN`` installs the
wheel and calls ``python -P benchmarks/gpu_bench.py run PLAN --out DIR``; docs/gpu.md says how to run it on a lent GPU.

    python benchmarks/gpu_bench.py run PLAN --out DIR [--deadline-s S] [--dry-run]
    python benchmarks/gpu_bench.py estimate [PLAN ...]     # the time box of each plan, from its case list
    python benchmarks/gpu_bench.py report DIR/PLAN.json    # rewrite PLAN.md from a result file

Plans: ``headline`` (first: correctness and every goal of issue 19) and ``rest`` (the remaining suites, by value).

How a run goes (``Controller``):

1. The install check (``gpu_wheel.verify``): the attnfast it imports must be this checkout's files, byte for
   byte, from the wheel built beforehand; otherwise it writes that result and measures nothing (exit 4).
2. Prepare phase, at most ``prepare_s``: the correctness commands (headline: ``gpu_smoke.py`` in bf16, fp32
   and fp16 and ``pytest tests/gpu`` with xdist; rest: ``pytest tests/ops tests/nn``) run while one worker
   process per case group (``Case.worker``) builds its providers and runs each once (torch.compile and
   Triton compiles happen here, on the CPU, in parallel). Workers hold at most ``PREPARE_MEMORY`` of the GPU
   between them; a provider that does not fit then is prepared later. Correctness still running at the
   end of the phase is interrupted (its per-test record keeps what finished).
3. Timing phase, the GPU to itself: cases in plan order, the highest value first, each in its worker.
   The providers of a case run interleaved (round r starts at provider r mod n), each call timed with
   CUDA events after zeroing a 256 MiB buffer (an L2 flush), in the way ``triton.testing.do_bench``
   times: events around each call, no synchronization between calls. A case gets a share of the
   remaining time in proportion to its estimate and runs up to ``rounds`` rounds (at least 3 when it
   can); a compile the prepare phase did not finish runs only if the later cases' estimates leave
   room for it (else that provider is skipped for time). Then, per provider: peak memory of one more
   call (``torch.cuda.max_memory_allocated``), bytes saved for backward (not around compiled graphs),
   agreement of the output with the reference provider, the SDPA backend a profiled training call
   ran, and for compiled providers the proof that their compiled graphs ran (``harness.CompileCounter``:
   every timed call ran a compiled graph, none compiled while timed), or the provider is marked
   invalid; a ``fused`` provider that fell back to attnfast's PyTorch path is invalid too. A provider
   that runs out of memory is recorded so; a case that no longer fits the time box is recorded as
   skipped for time. Training cases come last, after every other worker has exited: they also search
   the largest batch (``providers.step_largest_batch``).
4. After every case, ``PLAN.json`` (everything) and ``PLAN.md`` (the short report: each goal met /
   missed / not measured with its numbers) are rewritten atomically, so a run cut short keeps what it
   measured.

Files under ``--out``: ``PLAN.json``, ``PLAN.md``, ``PLAN_tests.log`` (pytest's output), ``PLAN_tests.jsonl``
(one line per finished test), ``PLAN_smoke.json`` (headline), and ``PLAN_run.log`` (gpu_run.sh's tee).

``--dry-run`` is the fake device the CPU tests use: tiny shapes in fp32, the Triton interpreter, the
``eager`` compile backend (Dynamo traces and the counts are checked, nothing is code-generated),
perf_counter instead of CUDA events, the same workers, phases, budgets and files. Its numbers mean
nothing and its files say so.

Estimates (``estimate``) are computed from each plan's cases with the cost model in ``estimate_case``:
compile and Triton-JIT seconds per provider, and per-call times from each shape's bytes and FLOPs at
planning rates for an H200. They are estimates, not measurements (no attnfast kernel has run on a GPU
yet); the tests assert each plan's total stays within its time box, and the run itself enforces the
box whatever the real times are.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # harness, providers, sdpa_providers, gpu_wheel (also under python -P)

SCHEMA = "attnfast.gpu_bench/1"
TIME_BOX_S = 480  # one device command: 8 minutes
MIB = 1024 * 1024
GIB = 1024 * MIB
L2_FLUSH_BYTES = 256 * MIB
PREPARE_MEMORY = 0.45  # share of the GPU the workers may hold together while correctness runs
MIN_ROUNDS = 3

# Planning rates for an H200 (KINDS.md: 4.3 TB/s device copy, 790 TFLOP/s bf16 matmul, measured there), taken
# at about half, as a kernel reaches; they size the time box, they are never reported as results.
RATES = {"bw": 2.0e12, "flops": {"bf16": 300e12, "fp16": 300e12, "fp32": 40e12}, "exp": 1.5e12}
# How much slower than the shape's minimum (bytes at RATES["bw"] and FLOPs at the dtype's rate) each
# provider is assumed to run, and its fixed cost per call (launches).
SLOWDOWN = {"fused": 1.5, "eager": 6.0, "compile": 3.0, "chunked": 4.0, "sdpa_default": 2.0,
            "sdpa_mem_efficient": 2.0, "sdpa_flash_padded": 3.0, "flex": 2.5, "reference": 1.2}
LAUNCH_S = {"fused": 3e-5, "eager": 3e-4, "compile": 1e-4, "chunked": 5e-4, "reference": 2e-3}
# Seconds to compile one provider at one shape (torch.compile: Dynamo, AOTAutograd, inductor, Triton, with
# the machine shared by the correctness run), the first compile in a worker more (imports, compile pool).
COMPILE_S = {"grid": 35.0, "sagan": 30.0, "flex": 45.0, "cbam": 30.0, "gate": 15.0}
FIRST_COMPILE_S = 15.0
JIT_S = {"grid": 12.0, "sagan": 12.0, "sagan_variant": 12.0, "cbam": 10.0, "gate": 4.0, "train": 20.0}
CASE_OVERHEAD_S = 2.0  # memory and saved-bytes passes, the agreement check, profiling, messages


# ----------------------------------------------------------------------------------------------
# cases and plans
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: ``providers`` on one op at one shape, dtype and mode, run in worker ``worker``.

    ``params`` (a tuple of (key, value) pairs) per op: grid: B, C, HW, Cg, up, A; sagan: B, C, H, W;
    sagan_variant: B, C, H, W, options; cbam: B, C, HW, light, channels_last; gate: B, C, HW,
    channels_last; train: model, size, batch, kwargs, cap (largest-batch search up to cap; 0: none)."""

    op: str
    name: str
    dtype: str
    mode: str
    providers: tuple
    worker: str
    params: tuple
    goal: str | None = None
    rounds: int = 20

    @property
    def id(self) -> str:
        return f"{self.op} {self.name} {self.dtype} {self.mode}"

    @property
    def p(self) -> dict:
        return dict(self.params)


def _params(**kw) -> tuple:
    return tuple(kw.items())


GRID_BLOCKS = {  # AttnVGG (width 1, A = 256): name -> (C_l, HW of l, C_g, up)
    "pool3@224": (256, 28, 512, 4), "pool4@224": (512, 14, 512, 2),
    "pool3@512": (256, 64, 512, 4), "pool4@512": (512, 32, 512, 2),
}
RESNET50_STAGES = {"stage1": (256, 56), "stage2": (512, 28), "stage3": (1024, 14), "stage4": (2048, 7)}
RAN56_STAGES = {"stage1": (256, 56), "stage2": (512, 28), "stage3": (1024, 14)}
SAGAN_PEERS = ("fused", "sdpa_default", "sdpa_mem_efficient", "sdpa_flash_padded", "flex", "eager", "compile")


def grid_case(block, B, dtype, worker, mode="fwd+bwd", goal=None, providers=("eager", "compile", "fused")):
    c, hw, cg, up = GRID_BLOCKS[block]
    return Case("grid", f"{block} B={B}", dtype, mode, providers, worker,
                _params(B=B, C=c, HW=hw, Cg=cg, up=up, A=256), goal)


def sagan_case(side, dtype, worker, B=8, C=128, mode="fwd+bwd", goal=None, providers=SAGAN_PEERS, rounds=20):
    return Case("sagan", f"B={B} C={C} {side}x{side} (N={side * side})", dtype, mode, providers, worker,
                _params(B=B, C=C, H=side, W=side), goal, rounds)


def cbam_case(stage, B, dtype, worker, light=False, channels_last=False, goal=None):
    c, hw = RESNET50_STAGES[stage]
    name = f"{stage}{'-light' if light else ''}{'-channels_last' if channels_last else ''} B={B}"
    return Case("cbam", name, dtype, "fwd+bwd", ("eager", "compile", "fused"), worker,
                _params(B=B, C=c, HW=hw, light=light, channels_last=channels_last), goal)


def gate_case(stage, B, dtype, worker, channels_last=False):
    c, hw = RAN56_STAGES[stage]
    return Case("gate", f"RAN-56 {stage}{'-channels_last' if channels_last else ''} B={B}", dtype, "fwd+bwd",
                ("eager", "compile", "fused"), worker, _params(B=B, C=c, HW=hw, channels_last=channels_last))


def train_case(model, size, batch, worker, cap, amp="bf16", kwargs=(), goal=None, rounds=10):
    return Case("train", f"{model}@{size} B={batch}", f"amp={amp}", "step", ("reference", "fused"), worker,
                _params(model=model, size=size, batch=batch, kwargs=tuple(kwargs), cap=cap), goal, rounds)


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    title: str
    cases: tuple
    correctness: tuple  # ("smoke" | "tests", args) pairs
    prepare_s: float  # the prepare phase's budget (correctness and compiles run in it)
    deadline_s: float = 445.0  # the whole run, from the controller's start (gpu_run.sh gives it less if it must)
    correctness_est_s: float = 0.0


HEADLINE = Plan(
    "headline", "first GPU run: correctness at real shapes and every goal of issue 19",
    cases=(
        grid_case("pool3@224", 32, "bf16", "grid", goal="grid"),
        grid_case("pool4@224", 32, "bf16", "grid", goal="grid"),
        grid_case("pool3@512", 8, "bf16", "grid", goal="grid"),
        grid_case("pool4@512", 8, "bf16", "grid", goal="grid"),
        sagan_case(64, "bf16", "sagan", goal="self"),
        sagan_case(128, "bf16", "sagan2", goal="self"),
        sagan_case(256, "bf16", "sagan", goal="self", rounds=10),
        *(cbam_case(s, 32, "bf16", "cbam", goal="cbam") for s in RESNET50_STAGES),
        *(gate_case(s, 32, "bf16", "misc") for s in RAN56_STAGES),
        grid_case("pool3@224", 32, "fp32", "misc"),
        grid_case("pool4@224", 32, "fp32", "misc"),
        train_case("attnvgg", 512, 32, "train", cap=1024, goal="attnvgg512"),
    ),
    correctness=(("smoke", ("--budget-s", "150")), ("tests", ("tests/gpu",))),
    prepare_s=200.0, correctness_est_s=170.0)

REST = Plan(
    "rest", "the other suites, by value: the op/nn correctness matrix on CUDA, then more shapes, modes and models",
    cases=(
        *(grid_case(b, 32 if b.endswith("224") else 8, "bf16", "grid", mode=m)
          for b in ("pool3@224", "pool4@512") for m in ("fwd", "bwd")),
        grid_case("pool3@224", 64, "bf16", "grid"),
        grid_case("pool4@224", 64, "bf16", "grid"),
        grid_case("pool3@224", 8, "bf16", "misc"),
        grid_case("pool3@512", 8, "fp32", "misc"),
        sagan_case(64, "fp16", "sagan", providers=SAGAN_PEERS[:5] + ("chunked",)),
        sagan_case(128, "fp16", "sagan", providers=SAGAN_PEERS[:5] + ("chunked",)),
        sagan_case(128, "bf16", "sagan", mode="fwd", providers=SAGAN_PEERS[:5]),
        sagan_case(128, "bf16", "sagan", mode="bwd", providers=SAGAN_PEERS[:5]),
        sagan_case(128, "bf16", "sagan", C=64, providers=("fused", "sdpa_default", "sdpa_mem_efficient",
                                                           "sdpa_flash_padded", "chunked")),
        *(Case("sagan_variant", f"B={b} C={c} {s}x{s} {','.join(k for k, _ in opts)}", "bf16", "fwd+bwd",
               ("fused", "chunked"), "sagan", _params(B=b, C=c, H=s, W=s, options=opts))
          for b, c, s, opts in ((1, 256, 128, (("pool", True),)), (2, 256, 64, (("heads", 2),)),
                                (2, 128, 64, (("value_dim", 64),)))),
        *(cbam_case(s, 64, "bf16", "cbam") for s in RESNET50_STAGES),
        cbam_case("stage1", 32, "fp32", "cbam2"),
        cbam_case("stage3", 32, "fp32", "cbam2"),
        cbam_case("stage1", 32, "bf16", "cbam2", light=True),
        cbam_case("stage1", 32, "bf16", "cbam2", channels_last=True),
        *(gate_case(s, 32, "fp32", "misc") for s in RAN56_STAGES),
        gate_case("stage1", 32, "bf16", "misc", channels_last=True),
        train_case("attnvgg", 224, 32, "train", cap=2048),
        train_case("resnet50-cbam", 224, 32, "train", cap=0),
        train_case("ran56", 224, 32, "train", cap=0),
        train_case("sagan_resnet", 128, 8, "train", cap=256, kwargs=(("width", 64),)),
    ),
    correctness=(("tests", ("tests/ops", "tests/nn")),),
    prepare_s=230.0, correctness_est_s=220.0)

PLANS = {p.name: p for p in (HEADLINE, REST)}
# correctness in the dry run: the same commands, cut to a few tiny cases
DRY_CORRECTNESS = {"smoke": ("--tiny", "--dtypes", "fp32", "--ops", "residual_gate"),
                   "tests": ("-k", "tiny and residual_gate")}
DRY_TEST_PATHS = ("tests/gpu",)

GOALS = {  # issue 19's headline goals
    "grid": "grid attention bf16 fwd+bwd >= 4x eager and >= 2x torch.compile at AttnVGG shapes",
    "self": "self-attention fwd+bwd >= 1.2x the best of SDPA and FlexAttention at N >= 4096",
    "sagan_train": "SAGAN (8, 128, 256, 256) training (forward + backward) on one GPU",
    "attnvgg512": "AttnVGG at 512 px: training step >= 1.5x faster, largest batch >= 3x",
    "cbam": "CBAM bf16 fwd+bwd >= 2x eager and >= 1.3x torch.compile",
}


def run_cases(plan: Plan, dry_run: bool) -> list:
    """The cases a run times: the plan's; in the dry run the first case of each op and of each mode, in two
    workers (``ops`` and ``train``: the training cases still wait for the other worker to exit)."""
    if not dry_run:
        return list(plan.cases)
    seen, out = set(), []
    for c in plan.cases:
        if c.op not in seen or c.mode not in seen:
            seen.update((c.op, c.mode))
            out.append(dataclasses.replace(c, worker="train" if c.op == "train" else "ops"))
    return out


def tiny(case: Case) -> dict:
    """The dry run's parameters for a case: the same op and providers at a tiny shape."""
    p = case.p
    if case.op == "grid":
        return dict(B=2, C=16, HW=8, Cg=32, up=2, A=16)
    if case.op == "sagan":
        return dict(B=2, C=16, H=6, W=5)
    if case.op == "sagan_variant":
        opts = tuple((k, 8 if k == "value_dim" else v) for k, v in p["options"])
        return dict(B=1, C=32, H=5, W=6, options=opts)
    if case.op == "cbam":
        return dict(B=2, C=32, HW=6, light=p["light"], channels_last=p["channels_last"])
    if case.op == "gate":
        return dict(B=2, C=8, HW=5, channels_last=p["channels_last"])
    kwargs = {"attnvgg": (("width_mult", 0.125),), "ran56": (("width", 8),),
              "sagan_resnet": (("width", 8),)}.get(p["model"], ())
    size = {"resnet50-cbam": 32}.get(p["model"], 64 if p["model"] != "sagan_resnet" else 16)
    return dict(model=p["model"], size=size, batch=2, kwargs=kwargs, cap=4 if p["cap"] else 0)


# ----------------------------------------------------------------------------------------------
# estimates
# ----------------------------------------------------------------------------------------------
ELT = {"bf16": 2, "fp16": 2, "fp32": 4}


def work(case: Case, p: dict | None = None) -> dict:
    """Bytes and FLOPs a case's timed call must move and do at least (its ``mode``), plus op facts."""
    p = case.p if p is None else p
    elt = ELT.get(case.dtype, 2)
    mode = case.mode
    if case.op == "grid":
        import providers

        b, f = providers.grid_roofline(p["B"], p["C"], p["HW"], p["Cg"], p["up"], p["A"], elt)[mode]
        return {"bytes": b, "flops": f}
    if case.op in ("sagan", "sagan_variant"):
        n = p["H"] * p["W"]
        opts = dict(p.get("options", ()))
        nk = n // 4 if opts.get("pool") else n
        dv = opts.get("value_dim", p["C"])
        d = max(p["C"] // 8, 1)
        pairs = p["B"] * n * nk
        fwd = pairs * (2 * d + 2 * dv)
        flops = {"fwd": fwd, "bwd": int(2.5 * fwd), "fwd+bwd": int(3.5 * fwd)}[mode]
        x_bytes = p["B"] * p["C"] * n * elt
        return {"bytes": {"fwd": 3, "bwd": 6, "fwd+bwd": 9}[mode] * x_bytes, "flops": flops, "pairs": pairs,
                "exps": pairs * (1 if mode == "fwd" else 2), "n": n}
    if case.op in ("cbam", "gate"):
        numel = p["B"] * p["C"] * p["HW"] * p["HW"]
        per = {"cbam": {"fwd": 4, "bwd": 6, "fwd+bwd": 10}, "gate": {"fwd": 3, "bwd": 5, "fwd+bwd": 8}}[case.op]
        return {"bytes": per[mode] * numel * elt, "flops": (10 if case.op == "cbam" else 4) * numel}
    # train: ~3x the forward FLOPs of the backbone per image (VGG16 15.5 GFLOP, ResNet-50 4.1, RAN-56 6.2 at 224)
    gflop224 = {"attnvgg": 15.5, "resnet50-cbam": 4.1, "ran56": 6.2, "sagan_resnet": 2.0}.get(p["model"], 5.0)
    flops = 3 * gflop224 * 1e9 * (p["size"] / 224) ** 2 * p["batch"]
    return {"bytes": 0, "flops": flops}


def call_s(case: Case, provider: str) -> float:
    """Estimated seconds of one timed call of ``provider`` (see RATES, SLOWDOWN, LAUNCH_S)."""
    w = work(case)
    rate = RATES["flops"].get(case.dtype, RATES["flops"]["bf16"])
    base = max(w["bytes"] / RATES["bw"], w["flops"] / rate, w.get("exps", 0) / RATES["exp"])
    slow = SLOWDOWN.get(provider, 3.0)
    if case.op in ("sagan", "sagan_variant") and provider in ("eager", "compile"):
        # the B x N x N scores: written and read ~6 times in fp32/bf16 through fwd+bwd
        base = max(base, 6 * case.p["B"] * w["n"] ** 2 * ELT.get(case.dtype, 2) / RATES["bw"] / slow)
    return base * slow + LAUNCH_S.get(provider, 1e-4)


def estimate_case(case: Case, first_in_worker: set | None = None) -> dict:
    """``prepare_s`` (compiles and first runs, in its worker during the prepare phase) and ``time_s``
    (its share of the timing phase) of one case. ``first_in_worker`` tracks which compile/JIT costs
    its worker already paid (updated in place)."""
    seen = first_in_worker if first_in_worker is not None else set()
    prep = 0.0
    for prov in case.providers:
        if prov == "compile" or prov == "flex":
            key = ("compiled", prov, case.op, case.params, case.dtype)  # one graph per shape, whatever the mode
            if key not in seen:
                prep += COMPILE_S.get("flex" if prov == "flex" else case.op, 30.0)
            seen.add(key)
            if "compile" not in seen:
                seen.add("compile")
                prep += FIRST_COMPILE_S
        elif prov in ("fused", "reference"):
            key = ("jit", case.op, case.dtype, prov)
            prep += JIT_S.get(case.op, 10.0) if key not in seen else 2.0
            seen.add(key)
        prep += 2 * call_s(case, prov)  # the warm-up calls
    calls = sum(call_s(case, prov) for prov in case.providers)
    if case.op == "train":
        prep = 2 * JIT_S["train"]  # two models built and stepped once at a small batch
        time_s = 8.0 + (case.rounds + 3) * calls  # the timing batch, then largest-batch search below
        if case.p["cap"]:
            # ~8 probes per model near its largest batch (~150 at 512 px: ~4x the timing batch's step)
            time_s += 2 * 8 * (1.0 + 4 * calls / 2)
    else:
        time_s = CASE_OVERHEAD_S + (case.rounds + 3) * calls
    return {"prepare_s": round(prep, 1), "time_s": round(time_s, 1)}


STARTUP_S = 25.0  # gpu_run.sh's install and check, and the controller's imports
FINALIZE_S = 10.0


def estimate(plan: Plan) -> dict:
    """The plan's time box by the cost model: the prepare phase is the longest of the correctness run and
    each worker's compiles (capped by ``prepare_s``; what does not fit there moves into timing), then the
    timing of every case in turn."""
    workers, per_case = {}, []
    seen = {}
    for case in plan.cases:
        e = estimate_case(case, seen.setdefault(case.worker, set()))
        per_case.append((case, e))
        workers[case.worker] = workers.get(case.worker, 0.0) + e["prepare_s"]
    longest = max(workers.values(), default=0.0)
    prepare = min(plan.prepare_s, max(plan.correctness_est_s, longest))
    overflow = sum(max(0.0, w - plan.prepare_s) for w in workers.values())
    timing = sum(e["time_s"] for _, e in per_case) + overflow
    total = STARTUP_S + prepare + timing + FINALIZE_S
    return {"plan": plan.name, "cases": len(plan.cases), "workers": {k: round(v, 1) for k, v in workers.items()},
            "correctness_s": plan.correctness_est_s, "prepare_s": round(prepare, 1),
            "prepare_overflow_s": round(overflow, 1), "timing_s": round(timing, 1), "startup_s": STARTUP_S,
            "finalize_s": FINALIZE_S, "total_s": round(total, 1), "deadline_s": plan.deadline_s,
            "time_box_s": TIME_BOX_S, "per_case": [{"case": c.id, **e} for c, e in per_case]}


def estimate_lines(plan: Plan) -> list:
    e = estimate(plan)
    return [f"{plan.name}: {e['cases']} cases in {len(e['workers'])} workers; estimate {e['total_s']:.0f} s "
            f"<= {TIME_BOX_S} s = startup {e['startup_s']:.0f} + prepare {e['prepare_s']:.0f} (correctness "
            f"{e['correctness_s']:.0f}, longest worker {max(e['workers'].values()):.0f}, budget {plan.prepare_s:.0f}) "
            f"+ timing {e['timing_s']:.0f} + finalize {e['finalize_s']:.0f}"]


# ----------------------------------------------------------------------------------------------
# worker: builds, prepares and times the cases of one group, on the controller's orders
# ----------------------------------------------------------------------------------------------
def _now() -> float:
    return time.time()  # epoch seconds: deadlines cross process boundaries


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1500]


def _is_oom(e: BaseException) -> bool:
    import providers

    return providers.is_oom(e)


class Bench:
    """A case built on the device: ``fns`` (provider -> callable), ``inputs``, ``grads`` for the
    outputs, ``status`` per provider (``pending``, ``ok``, ``deferred``, ``oom``, ``error``, ``skipped``)."""

    def __init__(self, case, fns, inputs, info):
        self.case, self.fns, self.inputs, self.info = case, fns, inputs, info
        self.grads = None
        self.status = {p: "pending" for p in fns}
        self.notes = {p: {} for p in fns}


class Worker:
    def __init__(self, plan: Plan, name: str, dry_run: bool, prepare_until: float):
        import torch

        import harness

        self.torch, self.harness = torch, harness
        self.plan, self.name, self.dry = plan, name, dry_run
        self.cases = [c for c in run_cases(plan, dry_run) if c.worker == name]
        self.prepare_until = prepare_until
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.benches = {}
        self.latest = 0.0  # the case being timed may compile until then (time_case)
        self.broken = None  # the CUDA error that broke this process's context
        self.flush = None
        if self.cuda:
            torch.backends.cudnn.benchmark = False
            share = PREPARE_MEMORY / max(1, len({c.worker for c in run_cases(plan, dry_run)}))
            torch.cuda.set_per_process_memory_fraction(share)
            self.memory_share = share

    # -- messages -------------------------------------------------------------------------------
    def send(self, **msg):
        sys.stdout.write(json.dumps(msg, default=str) + "\n")
        sys.stdout.flush()

    def log(self, text):
        print(f"[{self.name}] {text}", file=sys.stderr, flush=True)

    # -- building --------------------------------------------------------------------------------
    def dtype(self, case):
        t = self.torch
        if self.dry or case.op == "train":
            return t.float32
        return {"bf16": t.bfloat16, "fp16": t.float16, "fp32": t.float32}[case.dtype]

    def params(self, case):
        return tiny(case) if self.dry else case.p

    def build(self, case) -> Bench:
        import providers

        p, dt, dev = self.params(case), self.dtype(case), self.device
        names = list(case.providers)
        if case.op == "grid":
            fns = providers.grid(p["C"], p["Cg"], p["A"], p["up"], dt, dev, names)
            inputs = providers.grid_inputs(p["B"], p["C"], p["HW"], p["Cg"], p["up"], dt, dev)
        elif case.op == "sagan":
            fns = providers.sagan(p["C"], dt, dev, names)
            inputs = [providers.randn((p["B"], p["C"], p["H"], p["W"]), dt, dev, 0)]
        elif case.op == "sagan_variant":
            table = providers.sagan_variant(p["C"], dt, dev, tuple(p["options"]))
            fns = {n: table[n] for n in names}
            inputs = [providers.randn((p["B"], p["C"], p["H"], p["W"]), dt, dev, 0)]
        elif case.op in ("cbam", "gate"):
            shape = (p["B"], p["C"], p["HW"], p["HW"])
            if case.op == "cbam":
                fns = providers.cbam(p["C"], dt, dev, names, light=p["light"])
            else:
                fns = providers.gate(names)
            n_in = 1 if case.op == "cbam" else 2
            inputs = [providers.randn(shape, dt, dev, i, requires_grad=False) for i in range(n_in)]
            if p["channels_last"]:
                inputs = [t.to(memory_format=self.torch.channels_last) for t in inputs]
            inputs = [t.requires_grad_() for t in inputs]
        elif case.op == "train":
            fns = {}
            for attention in names:
                fns[attention] = providers.TrainStep(p["model"], p["size"], p["kwargs"], attention, "off" if self.dry
                                                     else case.dtype.split("=")[1], dev)
            inputs = None  # made at the timing batch when timed
        else:
            raise ValueError(f"unknown op {case.op!r}")
        info = {"params": p, "dtype_run": str(dt)}
        if case.op != "train":
            info.update(work(case, p))
        return Bench(case, fns, inputs, info)

    # -- one call --------------------------------------------------------------------------------
    def call(self, bench, provider, timer=None):
        """One call in the case's mode; with ``timer``, the timed region (fwd, bwd or both) is marked."""
        import harness

        fn = bench.fns[provider]
        case = bench.case
        mark = timer.mark if timer else (lambda: None)
        with harness.provider_context(fn):
            if case.op == "train":
                x, y = bench.inputs
                t0 = mark()
                fn(x, y)
                return t0, mark()
            t0 = mark() if case.mode != "bwd" else None
            outs = fn(*bench.inputs)
            outs = (outs,) if isinstance(outs, self.torch.Tensor) else tuple(o for o in outs if o is not None)
            if case.mode == "fwd":
                t1 = mark()
                return t0, t1
            if bench.grads is None:
                gen = self.torch.Generator().manual_seed(7)
                bench.grads = [self.torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
                               if o.requires_grad else None for o in outs]
            pairs = [(o, g) for o, g in zip(outs, bench.grads) if g is not None and o.requires_grad]
            if case.mode == "bwd":
                t0 = mark()
            self.torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            t1 = mark()
            for t in bench.inputs:
                t.grad = None
            for prm in getattr(fn, "parameters", lambda: ())():
                prm.grad = None
            return t0, t1

    def warmup(self, bench, provider, times=2):
        """Run a provider until compiled/JIT'd; record its status and the seconds it took."""
        import warnings

        from attnfast import _dispatch

        times = 1 if self.dry else times
        t0 = time.perf_counter()
        counter = getattr(bench.fns[provider], "counter", None)
        _dispatch._WARNED.clear()  # attnfast warns once per reason: make this provider's fall-backs visible
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(times):
                    self.call(bench, provider)
                if self.cuda:
                    self.torch.cuda.synchronize()
            bench.status[provider] = "ok"
            fallbacks = sorted({str(w.message) for w in caught if "using the PyTorch path" in str(w.message)})
            if fallbacks and provider == "fused":
                bench.status[provider] = "invalid"  # "fused" that ran attnfast's PyTorch path is not the kernels
                bench.notes[provider]["reason"] = "fell back to the PyTorch path: " + "; ".join(fallbacks)
            elif fallbacks:
                bench.notes[provider]["fallbacks"] = fallbacks
        except Exception as e:
            bench.notes[provider]["warmup_error"] = _err(e)
            bench.status[provider] = "oom" if _is_oom(e) else "error"
            self.check_context()
            self.release(collect=True)
        finally:
            self.release()
        bench.notes[provider]["warmup_s"] = round(time.perf_counter() - t0, 2)
        if counter is not None:
            bench.notes[provider]["graphs_after_warmup"] = counter.graphs
        return bench.status[provider]

    def release(self, collect=False):
        """Return cached blocks to the device; ``collect``: first break the reference cycles an exception
        leaves (its traceback holds the failed call's tensors)."""
        if collect:
            import gc

            gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def peak(self, fn) -> int | None:
        """Peak allocator growth (bytes) while ``fn()`` runs; None in the dry run (no device allocator)."""
        if not self.cuda:
            fn()
            return None
        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)

    def check_context(self):
        """After an error: a CUDA error that broke this process's context makes every later number void."""
        if not self.cuda or self.broken:
            return
        try:
            self.torch.cuda.synchronize()
        except Exception as e:
            self.broken = _err(e)

    # -- prepare ---------------------------------------------------------------------------------
    def prepare(self):
        for case in self.cases:
            if _now() >= self.prepare_until:
                self.send(event="prepared", case=case.id, status="deferred", reason="prepare phase over")
                continue
            t0 = time.perf_counter()
            try:
                bench = self.benches[case.id] = self.build(case)
            except Exception as e:
                self.send(event="prepared", case=case.id, status="error", reason=_err(e),
                          traceback=traceback.format_exc()[-3000:])
                self.check_context()
                continue
            if case.op == "train":
                self.prepare_train(bench)
            else:
                for prov in self.prepare_order(case):
                    if _now() >= self.prepare_until:
                        break
                    if prov in ("eager", "compile") and self.scores_exceed_device(case):
                        bench.status[prov] = "deferred"  # tried at timing, with the whole GPU
                        bench.notes[prov]["deferred"] = "its B x N x N scores exceed the device's memory"
                        continue
                    self.warmup(bench, prov)
                    if bench.status[prov] == "oom":  # only this worker's share of the GPU ran out
                        bench.status[prov] = "deferred"
                        bench.notes[prov]["prepare_oom"] = bench.notes[prov].pop("warmup_error", "")
            self.send(event="prepared", case=case.id, status="ok", seconds=round(time.perf_counter() - t0, 1),
                      providers={p: {"status": bench.status[p], **bench.notes[p]} for p in bench.fns})
        self.send(event="ready")

    def scores_exceed_device(self, case) -> bool:
        """Whether the reference SAGAN layer's fwd+bwd (~4 live B x N x N score matrices) cannot fit the device."""
        if case.op != "sagan" or not self.cuda:
            return False
        p = case.p
        scores = p["B"] * (p["H"] * p["W"]) ** 2 * ELT.get(case.dtype, 2)
        return 4 * scores > self.torch.cuda.get_device_properties(0).total_memory

    @staticmethod
    def prepare_order(case):
        order = list(case.providers)
        if "eager" in order and "compile" in order:  # eager first: where it cannot fit, compile is not tried
            order.remove("eager")
            order.insert(order.index("compile"), "eager")
        return order

    def prepare_train(self, bench):
        """Each model stepped at a small batch (cuDNN and Triton compiles); the timing batch comes later."""
        for prov, step in bench.fns.items():
            t0 = time.perf_counter()
            try:
                x, y = step.inputs(min(2, self.params(bench.case)["batch"]))
                step(x, y)
                if self.cuda:
                    self.torch.cuda.synchronize()
                bench.status[prov] = "deferred"  # warmed up; the timing batch is stepped when timed
            except Exception as e:
                bench.status[prov] = "error" if not _is_oom(e) else "deferred"
                bench.notes[prov]["warmup_error"] = _err(e)
            finally:
                step.release()
            bench.notes[prov]["warmup_s"] = round(time.perf_counter() - t0, 2)

    # -- timing ----------------------------------------------------------------------------------
    def timer(self):
        return CudaTimer(self.torch) if self.cuda else CpuTimer()

    def time_case(self, case_id, deadline, latest=None):
        """Time one case: rounds until ``deadline`` (its share); compiles and warm-ups the prepare phase left
        may run until ``latest`` (the time the cases after it do not need, by their estimates)."""
        case = next(c for c in self.cases if c.id == case_id)
        self.latest = deadline if latest is None else latest
        t_start = time.perf_counter()
        res = {"id": case.id, "status": "ok", "providers": {}}
        if self.cuda:
            self.torch.cuda.set_per_process_memory_fraction(1.0)
            if self.flush is None:
                self.flush = self.torch.empty(L2_FLUSH_BYTES // 4, dtype=self.torch.int32, device="cuda")
        if self.broken:
            return {**res, "status": "error", "reason": f"CUDA context broken earlier: {self.broken}"}
        bench = self.benches.get(case.id)
        try:
            if bench is None:
                bench = self.benches[case.id] = self.build(case)
            if case.op == "train":
                self.time_train(bench, deadline, res)
            else:
                self.time_op(bench, deadline, res)
        except Exception as e:
            res.update(status="error", reason=_err(e), traceback=traceback.format_exc()[-3000:])
            self.check_context()
        finally:
            if bench is not None:
                for p in bench.fns:
                    res["providers"].setdefault(p, {}).update(status=bench.status[p], **bench.notes[p])
                res["info"] = bench.info
            self.benches.pop(case.id, None)  # its inputs and outputs go; the compiled graphs stay cached
            self.release(collect=True)
        res["seconds"] = round(time.perf_counter() - t_start, 2)
        if self.broken:
            res["context_broken"] = self.broken
        return res

    def lazy_warmup(self, bench, deadline):
        for prov in self.prepare_order(bench.case):
            if bench.status[prov] not in ("pending", "deferred"):
                continue
            if prov == "compile" and bench.case.op == "sagan" and bench.status.get("eager") == "oom":
                bench.status[prov] = "skipped"
                bench.notes[prov]["reason"] = ("not attempted: eager ran out of memory at this shape, and the "
                                               "compiled reference materializes the same B x N x N scores")
                continue
            cost = (COMPILE_S.get("flex" if prov == "flex" else bench.case.op, 30.0) if prov in ("compile", "flex")
                    else JIT_S.get(bench.case.op, 10.0) if prov in ("fused", "reference") else 1.0)
            if _now() + cost > max(deadline, self.latest):
                bench.status[prov] = "skipped"
                bench.notes[prov]["reason"] = (f"skipped for time: its compile/warm-up (~{cost:.0f} s by the estimate) "
                                               "did not fit what the later cases leave")
                continue
            self.warmup(bench, prov, times=1)

    def timed_rounds(self, bench, deadline, res) -> dict:
        """Interleaved rounds of the providers whose status is ``ok`` (round r starts at provider r mod n),
        each call timed, the L2 flushed before it; until ``case.rounds`` or the deadline (after at least
        MIN_ROUNDS when a round fits). Returns provider -> seconds per call; a provider that fails is dropped."""
        active = [p for p in bench.case.providers if bench.status[p] == "ok"]
        times = {p: [] for p in active}
        rounds = bench.case.rounds if not self.dry else 2
        done = 0
        while done < rounds and active:
            r0 = _now()
            timer = self.timer()
            marks = []
            for p in active[done % len(active):] + active[:done % len(active)]:
                if self.flush is not None:
                    self.flush.zero_()
                try:
                    marks.append((p, self.call(bench, p, timer)))
                except Exception as e:
                    bench.status[p] = "oom" if _is_oom(e) else "error"
                    bench.notes[p]["timing_error"] = _err(e)
                    self.check_context()
                    if self.broken:
                        raise
            for (p, _), dt in zip(marks, timer.elapsed([m for _, m in marks])):
                if bench.status[p] == "ok":
                    times[p].append(dt)
            active = [p for p in active if bench.status[p] == "ok"]
            done += 1
            took = _now() - r0
            if (_now() + took > deadline and done >= MIN_ROUNDS) or (_now() > deadline and done >= 1):
                break
        res["rounds"] = done
        for p, ts in times.items():
            if ts:
                bench.notes[p]["times"] = stats(ts)
        return times

    def time_op(self, bench, deadline, res):
        self.lazy_warmup(bench, deadline)
        counters = {p: getattr(bench.fns[p], "counter", None) for p in bench.case.providers}
        before = {p: c.snapshot() for p, c in counters.items() if c is not None}
        times = self.timed_rounds(bench, deadline, res)
        for p, ts in times.items():
            c = counters.get(p)
            if c is not None and bench.status[p] == "ok":
                verdict = c.verdict(before[p], len(ts))
                bench.notes[p]["compile"] = verdict
                if not verdict["valid"]:
                    bench.status[p] = "invalid"
        if not any(times.values()):
            res.update(status="error", reason="no provider produced a timing")
        self.after_timing(bench)

    def after_timing(self, bench):
        """Per provider that timed: peak memory of one call, bytes saved for backward, agreement of the first
        output with the reference provider's, and the SDPA backend a profiled call ran."""
        import providers

        torch, harness = self.torch, self.harness
        ok = [p for p in bench.case.providers if bench.status[p] in ("ok", "invalid")]
        for p in ok:
            try:
                bench.notes[p]["peak_mem_bytes"] = self.peak(lambda: self.call(bench, p))
            except Exception as e:
                bench.notes[p]["peak_mem_error"] = _err(e)
                self.release(collect=True)
            finally:
                self.release()
        ref_name = next((p for p in ("eager", "fused") if p in ok), ok[0] if ok else None)
        ref_out = None
        for p in ([ref_name] + [q for q in ok if q != ref_name]) if ref_name else []:
            fn = bench.fns[p]
            # saved-tensor hooks around a compiled graph may make Dynamo compile another: not for those
            hooks = harness.SavedBytes() if getattr(fn, "counter", None) is None else None
            try:
                with harness.provider_context(fn), hooks or contextlib.nullcontext():
                    out = fn(*bench.inputs)
                out = out if isinstance(out, torch.Tensor) else out[0]
                if hooks is not None:
                    bench.notes[p]["saved_bytes"] = int(hooks.total)
                flat = out.detach().float()
                del out
                if p == ref_name:
                    ref_out = flat
                    bench.notes[p]["agreement"] = {"vs": p}
                elif ref_out is not None:
                    diff = (flat - ref_out)
                    bench.notes[p]["agreement"] = {
                        "vs": ref_name, "max_abs": float(diff.abs().max()),
                        "rel_l2": float(diff.norm() / ref_out.norm().clamp_min(1e-30)),
                        "nonfinite": int((~torch.isfinite(flat)).sum())}
                del flat
            except Exception as e:
                bench.notes[p]["check_error"] = _err(e)
                self.release(collect=True)
            finally:
                for t in bench.inputs:
                    t.grad = None
            if isinstance(fn, providers.SdpaBlock):
                try:
                    bench.notes[p]["backend"] = fn.backend(bench.inputs[0])
                except Exception as e:
                    bench.notes[p]["backend"] = {"error": _err(e)}
                finally:
                    for prm in fn.parameters():
                        prm.grad = None
                    for t in bench.inputs:
                        t.grad = None

    def time_train(self, bench, deadline, res):
        import providers

        torch = self.torch
        p = self.params(bench.case)
        order = list(bench.fns)
        bench.inputs = bench.fns[order[0]].inputs(p["batch"])
        for prov in order:  # the timing batch, once, untimed
            if bench.status[prov] in ("deferred", "pending", "ok"):
                self.warmup(bench, prov, times=1)
        times = self.timed_rounds(bench, deadline, res)
        for q in times:
            if bench.status[q] == "ok":
                try:
                    bench.notes[q]["peak_mem_bytes"] = self.peak(lambda: self.call(bench, q))
                except Exception as e:
                    bench.notes[q]["peak_mem_error"] = _err(e)
                    self.release(collect=True)
        bench.info["batch"] = p["batch"]
        bench.info["image_size"] = p["size"]
        cap = p["cap"]
        steps = dict(bench.fns)
        bench.fns = {q: None for q in order}  # let the timed models go before searching
        bench.inputs = None
        del steps
        self.release()
        if not cap:
            return
        for q in order:
            if bench.status[q] not in ("ok",):
                continue
            if _now() >= deadline:
                bench.notes[q]["max_batch"] = {"skipped": "skipped for time"}
                continue
            step = providers.TrainStep(p["model"], p["size"], p["kwargs"], q,
                                       "off" if self.dry else bench.case.dtype.split("=")[1], self.device)
            free = torch.cuda.mem_get_info()[0] if self.cuda else None
            found = providers.step_largest_batch(step, p["batch"], cap, self.peak, deadline)
            found["free_bytes_at_start"] = free
            bench.notes[q]["max_batch"] = found
            del step
            self.release()

    # -- the command loop ------------------------------------------------------------------------
    def serve(self):
        import attnfast

        self.send(event="hello", pid=os.getpid(), attnfast=os.path.dirname(attnfast.__file__),
                  host=self.harness.device_info() if self.cuda else None,
                  memory_share=getattr(self, "memory_share", None))
        self.prepare()
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
            except json.JSONDecodeError:
                continue
            if cmd.get("cmd") == "quit":
                break
            if cmd.get("cmd") == "time":
                res = self.time_case(cmd["case"], cmd["deadline"], cmd.get("latest"))
                self.send(event="result", case=cmd["case"], result=res)


class CudaTimer:
    """CUDA events around each timed region; read after one synchronize per round."""

    def __init__(self, torch):
        self.torch = torch

    def mark(self):
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def elapsed(self, pairs):
        self.torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in pairs]


class CpuTimer:
    """The dry run's timer: perf_counter around each region (nothing is asynchronous on a CPU)."""

    def mark(self):
        return time.perf_counter()

    def elapsed(self, pairs):
        return [b - a for a, b in pairs]


def stats(ts) -> dict:
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) >= 2 else [ts[0]] * 4
    return {"median_s": statistics.median(ts), "p20_s": q[0], "p80_s": q[3], "min_s": ts[0], "max_s": ts[-1],
            "n": len(ts)}


# ----------------------------------------------------------------------------------------------
# goals and the report
# ----------------------------------------------------------------------------------------------
PEERS = ("sdpa_default", "sdpa_mem_efficient", "sdpa_flash_padded", "flex")


def median(case_doc, provider):
    """The provider's median seconds, or None when it has no valid timing (not run, failed, invalid)."""
    p = case_doc.get("providers", {}).get(provider) or {}
    if p.get("status") != "ok" or not p.get("times"):
        return None
    return p["times"]["median_s"]


def ratio(case_doc, baseline, provider="fused"):
    a, b = median(case_doc, baseline), median(case_doc, provider)
    return None if a is None or b is None or b <= 0 else a / b


def _x(v):
    return "—" if v is None else f"{v:.2f}x"


def evaluate_goals(doc) -> list:
    """Each goal of issue 19: ``met`` (every case measured, all criteria met), ``missed`` (a measured case
    misses one), ``not measured`` (no case has the numbers), with a line per case."""
    goals = []
    cases = doc.get("cases", [])

    def verdict(gid, rows, checks):
        measured = [r for r in rows if r["measured"]]
        if not measured:
            status = "not measured"
        elif any(not r["met"] for r in measured):
            status = "missed"
        else:
            status = "met" if len(measured) == len(rows) else f"met where measured ({len(measured)} of {len(rows)})"
        goals.append({"id": gid, "goal": GOALS[gid], "status": status, "criteria": checks, "cases": rows})

    def vs_eager_and_compile(gid, need_eager, need_compile, checks):
        rows = []
        for c in cases:
            if c.get("goal") != gid:
                continue
            e, k = ratio(c, "eager"), ratio(c, "compile")
            rows.append({"case": c["id"], "vs_eager": e, "vs_compile": k, "measured": e is not None and k is not None,
                         "met": e is not None and k is not None and e >= need_eager and k >= need_compile,
                         "text": f"{_x(e)} eager, {_x(k)} compile"})
        verdict(gid, rows, checks)

    vs_eager_and_compile("grid", 4, 2, "fused >= 4x eager and >= 2x compile, each case")

    rows = []
    for c in cases:
        if c.get("goal") != "self":
            continue
        peers = {p: median(c, p) for p in PEERS if median(c, p) is not None}
        best = min(peers, key=peers.get) if peers else None
        f = median(c, "fused")
        r = peers[best] / f if best and f else None
        rows.append({"case": c["id"], "best_peer": best, "vs_best": r, "peers_timed": sorted(peers),
                     "measured": r is not None, "met": r is not None and r >= 1.2,
                     "text": f"{_x(r)} the best peer ({best or 'none timed'}; timed: {', '.join(sorted(peers)) or '—'})"})
    verdict("self", rows, "fused fwd+bwd >= 1.2x the fastest of SDPA (default, mem-efficient, flash padded) and "
                          "compiled FlexAttention, each case with N >= 4096")

    rows = []
    for c in cases:
        if c.get("op") == "sagan" and c.get("mode") == "fwd+bwd" and (c.get("info") or {}).get("params") == \
                {"B": 8, "C": 128, "H": 256, "W": 256}:
            f = (c.get("providers") or {}).get("fused") or {}
            ran = f.get("status") == "ok" and bool(f.get("times"))
            peak = f.get("peak_mem_bytes")
            rows.append({"case": c["id"], "measured": c.get("status") == "ok", "met": ran,
                         "text": (f"fused fwd+bwd ran: {f['times']['median_s'] * 1e3:.1f} ms, peak "
                                  f"{peak / GIB:.1f} GiB" if ran and peak is not None else
                                  f"fused: {f.get('status', 'not run')} {f.get('timing_error') or f.get('warmup_error') or ''}"
                                  ).strip()})
    verdict("sagan_train", rows, "the fused layer's forward + backward at x = (8, 128, 256, 256) runs on one GPU")

    rows = []
    for c in cases:
        if c.get("goal") != "attnvgg512":
            continue
        s = ratio(c, "reference")
        mb = {q: ((c.get("providers") or {}).get(q) or {}).get("max_batch") or {} for q in ("reference", "fused")}
        bf, br = mb["fused"].get("max_batch"), mb["reference"].get("max_batch")
        # the reference's limit must be found (a failing batch seen); the fused one may be a lower bound (cap)
        known = bool(bf and br and mb["reference"].get("first_failing") and
                     (mb["fused"].get("first_failing") or mb["fused"].get("capped")))
        b = bf / br if known else None
        bound = ">= " if known and not mb["fused"].get("first_failing") else ""
        rows.append({"case": c["id"], "step_speedup": s, "batch_ratio": b, "batch_ratio_is_lower_bound": bool(bound),
                     "max_batch": {"reference": br, "fused": bf},
                     "measured": s is not None and b is not None and (not bound or b >= 3),
                     "met": s is not None and b is not None and s >= 1.5 and b >= 3,
                     "text": f"step {_x(s)} faster; largest batch {bf} vs {br} "
                             f"({bound}{_x(b) if b is not None else 'limit not found'})"})
    verdict("attnvgg512", rows, "bf16-autocast training step >= 1.5x faster and largest batch >= 3x the reference's")

    vs_eager_and_compile("cbam", 2, 1.3, "fused >= 2x eager and >= 1.3x compile, each ResNet-50 stage")
    return goals


def _ms(s):
    return "—" if s is None else (f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:.0f}")


def _provider_note(p: dict) -> str:
    notes = []
    if p.get("compile"):
        v = p["compile"]
        notes.append(f"compiled ({v['backend']}): {v['graphs']} graph(s), {v['graph_calls']} graph calls in "
                     f"{v['calls']} timed calls" + ("" if v["valid"] else f" — INVALID: {v['reason']}"))
    b = p.get("backend")
    if b:
        prof = b.get("profiled") or {}
        notes.append(f"SDPA: dispatch picks {b.get('sdpa_choice')}, ran {', '.join(prof.get('backends') or []) or '?'}"
                     if "error" not in b else f"backend probe failed: {b['error']}")
    a = p.get("agreement")
    if a and "rel_l2" in a:
        notes.append(f"vs {a['vs']}: rel L2 {a['rel_l2']:.1e}" + (f", {a['nonfinite']} non-finite" if a["nonfinite"] else ""))
    for key in ("reason", "timing_error", "warmup_error", "prepare_oom", "peak_mem_error", "check_error"):
        if p.get(key) and (key != "prepare_oom" or p.get("status") != "ok"):
            notes.append(f"{key.replace('_', ' ')}: {str(p[key])[:160]}")
    mb = p.get("max_batch")
    if mb:
        if mb.get("max_batch") is None:
            notes.append(f"largest batch: not found ({mb.get('error') or mb.get('skipped')})")
        else:
            notes.append(f"largest batch {mb['max_batch']}" + (
                f" (first failing {mb['first_failing']})" if mb.get("first_failing") else
                " (cap reached)" if mb.get("capped") else " (lower bound)") + f", {len(mb.get('probes', []))} probes")
    return "; ".join(notes)


def render_markdown(doc) -> str:
    host = doc.get("host", {})
    L = [f"# attnfast GPU run `{doc['plan']}`: {host.get('device', '?')}", ""]
    if doc.get("dry_run"):
        L += ["**DRY RUN on a CPU (fake device): tiny shapes, interpreter, eager compile backend. These numbers "
              "measure nothing.**", ""]
    inst = doc.get("install") or {}
    wheel = inst.get("wheel") or {}
    L += [f"- {doc.get('title', '')}",
          f"- torch {host.get('torch')}, triton {host.get('triton')}, python {host.get('python')}, "
          f"CUDA {host.get('cuda')}; {doc.get('started_utc')} → {doc.get('finished_utc') or '(running or cut short)'}; "
          f"{'complete' if doc.get('complete') else 'INCOMPLETE'}",
          f"- install check: {'ok' if inst.get('ok') else 'FAILED: ' + '; '.join(inst.get('problems', []))}"
          + (f" (wheel {wheel.get('wheel')}, commit {str(wheel.get('commit'))[:12]}"
             f"{', uncommitted changes' if wheel.get('dirty') else ''})" if wheel else ""),
          f"- timing: {doc.get('settings', {}).get('timer')}; medians of interleaved rounds; speedup = "
          "baseline median / fused median; memory = peak growth of one call (allocator).", ""]
    L += ["## Goals", "", "| goal | status | numbers |", "|---|---|---|"]
    for g in doc.get("goals", []):
        nums = "<br>".join(f"{r['case']}: {r['text']}" for r in g["cases"]) or "no case"
        L.append(f"| {g['goal']} | **{g['status']}** | {nums} |")
    L += ["", "## Correctness", ""]
    for name, c in (doc.get("correctness") or {}).items():
        L.append(f"- `{name}`: {c.get('summary', c.get('status'))}")
        for f in (c.get("failed") or [])[:15]:
            L.append(f"  - FAILED {f}")
    L += ["", "## Cases", "",
          "| case | provider | median ms | p20–p80 ms (calls) | vs fused | peak MiB | notes |", "|---|---|---|---|---|---|---|"]
    for c in doc.get("cases", []):
        if c.get("status") in ("pending", "skipped") or not c.get("providers"):
            continue
        for name, p in c["providers"].items():
            t = p.get("times") or {}
            rng = f"{_ms(t.get('p20_s'))}–{_ms(t.get('p80_s'))} (n={t.get('n')})" if t else "—"
            base = "fused" if "fused" in c["providers"] else None
            vs = _x(ratio(c, name, base)) if base and name != base else ""
            peak = p.get("peak_mem_bytes")
            status = "" if p.get("status") == "ok" else f"**{p.get('status')}** "
            L.append(f"| {c['id']} | {name} | {_ms(t.get('median_s')) if t else '—'} | {rng} | {vs} | "
                     f"{'—' if peak is None else f'{peak / MIB:.0f}'} | {status}{_provider_note(p)} |")
    missing = [c for c in doc.get("cases", []) if c.get("status") != "ok"]
    if missing:
        L += ["", "## Not measured", ""]
        L += [f"- {c['id']}: {c.get('status')}: {c.get('reason', '')}" for c in missing]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------------
# controller
# ----------------------------------------------------------------------------------------------
class Child:
    def __init__(self, name, popen, kind):
        self.name, self.popen, self.kind = name, popen, kind
        self.state = "starting"
        self.started = _now()
        self.ended = None


class Controller:
    def __init__(self, plan: Plan, out: str, dry_run: bool, deadline_s: float, python: str = sys.executable):
        self.plan, self.out, self.dry, self.python = plan, os.path.abspath(out), dry_run, python
        self.cases = run_cases(plan, dry_run)
        self.deadline_s = deadline_s
        self.t0 = _now()
        self.events = queue.Queue()
        self.workers, self.checks = {}, {}
        self.paths = {k: os.path.join(self.out, f"{plan.name}{suffix}") for k, suffix in
                      (("json", ".json"), ("md", ".md"), ("tests_log", "_tests.log"),
                       ("tests_jsonl", "_tests.jsonl"), ("smoke", "_smoke.json"))}

    # -- output ------------------------------------------------------------------------------------
    def write(self):
        from attnfast.train.checkpoint import atomic_write

        self.doc["elapsed_s"] = round(_now() - self.t0, 1)
        self.doc["goals"] = evaluate_goals(self.doc)
        text = json.dumps(self.doc, indent=1, default=str)
        md = render_markdown(self.doc)
        atomic_write(self.paths["json"], lambda f: f.write(text), mode="w")
        atomic_write(self.paths["md"], lambda f: f.write(md), mode="w")

    def log(self, text):
        print(f"[gpu_bench {_now() - self.t0:6.1f} s] {text}", flush=True)

    # -- children ----------------------------------------------------------------------------------
    def env(self, worker: str | None = None) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.dry:
            # the correctness commands run the kernels through the interpreter; the workers' "fused" is
            # attnfast's CPU path (the interpreter would only slow the rehearsal of the runner down)
            env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", ATTNFAST_BENCH_COMPILE_BACKEND="eager")
            env.pop("ATTNFAST_BACKEND", None)
        else:
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "4")
        return env

    def start_worker(self, name):
        cmd = [self.python, "-P", os.path.abspath(__file__), "worker", self.plan.name, "--worker", name,
               "--prepare-until", repr(self.t0 + self.plan.prepare_s)] + (["--dry-run"] if self.dry else [])
        popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                 env=self.env(name), cwd=REPO)
        child = Child(name, popen, "worker")
        self.workers[name] = child
        self.doc["workers"][name] = {"cases": [c.id for c in self.cases if c.worker == name],
                                     "pid": popen.pid, "state": "starting"}

        def read():
            for line in popen.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.events.put((name, msg))
            self.events.put((name, {"event": "eof"}))

        threading.Thread(target=read, daemon=True).start()

    def correctness_cmd(self, kind, args):
        py = [self.python, "-P"]
        if kind == "smoke":
            cmd = py + [os.path.join(HERE, "gpu_smoke.py"), "--out", self.paths["smoke"], *args]
            return cmd + list(DRY_CORRECTNESS["smoke"]) if self.dry else cmd
        paths = list(DRY_TEST_PATHS) if self.dry else list(args)
        cmd = py + ["-m", "pytest", *paths, "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "gpu_progress",
                    "--progress-jsonl", self.paths["tests_jsonl"]]
        import importlib.util

        if not self.dry and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(8 if self.plan.name == "rest" else 6)]
        return cmd + list(DRY_CORRECTNESS["tests"]) if self.dry else cmd

    def start_correctness(self):
        for kind, args in self.plan.correctness:
            cmd = self.correctness_cmd(kind, args)
            if kind == "tests":
                for k in ("tests_jsonl", "tests_log"):
                    if os.path.exists(self.paths[k]):
                        os.unlink(self.paths[k])
                log = open(self.paths["tests_log"], "w")
                popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO)
                log.close()
            else:
                popen = subprocess.Popen(cmd, env=self.env(), cwd=REPO)
            self.checks[kind] = Child(kind, popen, "check")
            self.doc["correctness"][kind] = {"command": " ".join(os.path.relpath(c, REPO) if c.startswith(REPO)
                                                                 else c for c in cmd), "status": "running"}
            self.log(f"started {kind}: {self.doc['correctness'][kind]['command']}")

    def stop_correctness(self, why):
        for kind, ch in self.checks.items():
            if ch.popen.poll() is None:
                self.log(f"interrupting {kind}: {why}")
                ch.popen.send_signal(signal.SIGINT)
                self.doc["correctness"][kind]["cut_short"] = why
        for kind, ch in self.checks.items():
            try:
                ch.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                ch.popen.kill()
                ch.popen.wait()
            self.summarize_check(kind)

    def summarize_check(self, kind):
        ch = self.checks[kind]
        d = self.doc["correctness"][kind]
        if ch.ended is None:
            ch.ended = _now()
        d.update(exit_code=ch.popen.returncode, seconds=round(ch.ended - ch.started, 1))
        if kind == "smoke":
            try:
                with open(self.paths["smoke"]) as f:
                    s = json.load(f)
                ran = [r for r in s["results"] if not r.get("skipped")]
                failed = [f"{r['op']} {r['case']} {r['dtype']}: {r.get('error') or 'mismatch'}"[:300]
                          for r in ran if not r["pass"]]
                d.update(status="passed" if s.get("pass") and s.get("complete") else
                         ("failed" if failed else "incomplete"), failed=failed,
                         summary=f"{len(ran)} of {len(s['results'])} cases run, {len(failed)} failed "
                                 f"({'complete' if s.get('complete') else 'incomplete'}); file {os.path.basename(self.paths['smoke'])}")
            except (OSError, ValueError, KeyError) as e:
                d.update(status="no result", summary=f"no readable smoke result ({_err(e)}); exit {ch.popen.returncode}")
            return
        counts, failed = {}, []
        try:
            with open(self.paths["tests_jsonl"]) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
                    if rec["outcome"] == "failed":
                        failed.append(f"{rec['nodeid']}: {(rec.get('error') or '').strip().splitlines()[-1:] or ''}"[:300])
        except OSError:
            pass
        tail = ""
        try:
            with open(self.paths["tests_log"]) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            tail = lines[-1] if lines else ""
        except OSError:
            pass
        ok = ch.popen.returncode == 0 and not failed
        d.update(status="passed" if ok else ("failed" if failed or ch.popen.returncode not in (0, 5) else "incomplete"),
                 counts=counts, failed=failed,
                 summary=f"{', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'no test finished'}; "
                         f"exit {ch.popen.returncode}{'; cut short' if d.get('cut_short') else ''}; pytest: {tail[:200]}")

    # -- events ------------------------------------------------------------------------------------
    def handle(self, name, msg):
        w = self.doc["workers"][name]
        ev = msg.get("event")
        if ev == "hello":
            w.update(state="preparing", attnfast=msg.get("attnfast"), memory_share=msg.get("memory_share"))
            if msg.get("host") and "cuda" not in self.doc["host"]:  # the device, as a worker sees it
                self.doc["host"].update(msg["host"])
            self.workers[name].state = "preparing"
            mine = (self.doc.get("install") or {}).get("location")
            if mine and os.path.realpath(msg.get("attnfast", "")) != mine:
                w["problem"] = f"imports attnfast from {msg.get('attnfast')}, the controller from {mine}"
        elif ev == "prepared":
            case = self.case_doc(msg["case"])
            case["prepare"] = {k: v for k, v in msg.items() if k not in ("event", "case")}
            self.log(f"{name}: prepared {msg['case']}: {msg.get('status')} "
                     + " ".join(f"{p}={v['status']}" for p, v in (msg.get("providers") or {}).items()))
        elif ev == "ready":
            self.workers[name].state = "ready"
            w["state"] = "ready"
            w["ready_s"] = round(_now() - self.t0, 1)
        elif ev == "result":
            case = self.case_doc(msg["case"])
            res = msg["result"]
            case.update({k: v for k, v in res.items() if k != "id"})
            case["finished_s"] = round(_now() - self.t0, 1)
            self.workers[name].state = "ready"
            self.log(f"{name}: {msg['case']}: {res.get('status')} in {res.get('seconds')} s "
                     + " ".join(f"{p}={_ms(median(case, p))}ms" for p in case.get("providers", {})))
        elif ev == "eof":
            ch = self.workers[name]
            ch.popen.wait()
            ch.state = "done" if ch.state == "quitting" else "dead"
            w.update(state=ch.state, exit_code=ch.popen.returncode)
            if ch.state == "dead":
                self.log(f"worker {name} exited unexpectedly (exit {ch.popen.returncode})")
        self.write()

    def pump(self, timeout):
        try:
            name, msg = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        self.handle(name, msg)
        return name, msg

    def case_doc(self, case_id):
        return next(c for c in self.doc["cases"] if c["id"] == case_id)

    def quit_worker(self, name):
        ch = self.workers[name]
        if ch.state in ("done", "dead", "quitting"):
            return
        try:
            ch.popen.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            ch.popen.stdin.flush()
            ch.state = "quitting"
            self.doc["workers"][name]["state"] = "quitting"
        except OSError:
            ch.state = "dead"

    # -- phases --------------------------------------------------------------------------------------
    def run(self) -> int:
        import platform

        import gpu_wheel
        import harness
        import torch
        import triton

        self.doc = {
            "schema": SCHEMA, "plan": self.plan.name, "title": self.plan.title, "dry_run": self.dry,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished_utc": None, "complete": False, "host": {}, "settings": {}, "install": None,
            "estimate": estimate(self.plan), "phases": {}, "correctness": {}, "workers": {}, "goals": [],
            "cases": [{"id": c.id, "op": c.op, "name": c.name, "dtype": c.dtype, "mode": c.mode, "worker": c.worker,
                       "goal": c.goal, "providers_planned": list(c.providers), "status": "pending"}
                      for c in self.cases]}
        os.makedirs(self.out, exist_ok=True)
        # no CUDA context here (it would hold GPU memory all run): the device's name comes with a worker's hello
        cuda = torch.cuda.is_available() and not self.dry
        self.doc["host"] = {"device": "CPU (dry run)" if self.dry else "CUDA device (see the workers' hello)",
                            "torch": torch.__version__, "triton": triton.__version__,
                            "python": platform.python_version(), "python_executable": self.python,
                            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
        self.doc["settings"] = {
            "deadline_s": self.deadline_s, "prepare_s": self.plan.prepare_s, "timer":
            "CUDA events per call after an L2 flush (256 MiB zeroed), no sync between calls" if cuda else
            "perf_counter (dry run)", "compile_backend": "eager (dry run)" if self.dry else harness.compile_backend(),
            "prepare_memory_share": PREPARE_MEMORY, "min_rounds": MIN_ROUNDS,
            "tf32": {"matmul": str(getattr(torch.backends.cuda.matmul, "fp32_precision", None) or
                                   torch.backends.cuda.matmul.allow_tf32),
                     "cudnn": str(getattr(torch.backends.cudnn, "fp32_precision", None) or
                                  torch.backends.cudnn.allow_tf32)}}
        self.doc["install"] = gpu_wheel.verify(REPO, allow_checkout=self.dry)
        self.write()
        if not self.doc["install"]["ok"]:
            self.log("install check FAILED: " + "; ".join(self.doc["install"]["problems"]))
            self.doc["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            self.write()
            return 4
        if not cuda and not self.dry:
            self.doc["error"] = "no CUDA device visible (use --dry-run for the CPU rehearsal)"
            self.doc["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            self.write()
            self.log("error: no CUDA device visible (torch.cuda.is_available() is False)")
            return 3
        status = 0
        try:
            status = self.phases()
        except KeyboardInterrupt:
            self.log("interrupted: writing what was measured")
            self.doc["interrupted"] = True
            for c in self.doc["cases"]:
                if c["status"] == "pending":
                    c.update(status="skipped", reason="run interrupted (time box)")
            status = 130
        finally:
            for ch in list(self.workers.values()) + list(self.checks.values()):
                if ch.popen.poll() is None:
                    ch.popen.kill()
            for kind in self.checks:
                if self.doc["correctness"][kind].get("status") == "running":
                    self.summarize_check(kind)
            self.doc["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            self.doc["complete"] = (all(c["status"] != "skipped" and c["status"] != "pending" for c in self.doc["cases"])
                                    and all(not c.get("cut_short") for c in self.doc["correctness"].values()))
            self.write()
        self.log(f"wrote {self.paths['json']} and {self.paths['md']}")
        for g in self.doc["goals"]:
            self.log(f"goal: {g['status']:>14}: {g['goal']}")
        return status

    def phases(self) -> int:
        timing_end = self.t0 + self.deadline_s - FINALIZE_S
        prep_end = min(self.t0 + self.plan.prepare_s, timing_end)
        self.doc["phases"]["prepare"] = {"start_s": round(_now() - self.t0, 1), "budget_s": self.plan.prepare_s}
        self.start_correctness()
        for name in dict.fromkeys(c.worker for c in self.cases):
            self.start_worker(name)
        self.write()
        while _now() < prep_end:
            for kind, ch in self.checks.items():
                if ch.ended is None and ch.popen.poll() is not None:
                    ch.ended = _now()
                    self.summarize_check(kind)
                    self.log(f"{kind}: {self.doc['correctness'][kind]['summary']}")
            workers_done = all(w.state in ("ready", "dead") for w in self.workers.values())
            if workers_done and all(ch.ended is not None for ch in self.checks.values()):
                break
            self.pump(0.5)
        self.stop_correctness("the prepare phase's budget is spent")
        self.doc["phases"]["prepare"]["end_s"] = round(_now() - self.t0, 1)
        self.doc["phases"]["timing"] = {"start_s": round(_now() - self.t0, 1),
                                        "still_preparing": [n for n, w in self.workers.items() if w.state == "preparing"]}
        self.write()
        est = {c.id: estimate_case(c)["time_s"] for c in self.cases}
        pending = list(self.cases)
        while pending:
            for name, ch in self.workers.items():  # a worker with nothing left exits (and frees its memory)
                if ch.state == "ready" and not any(c.worker == name for c in pending):
                    self.quit_worker(name)
            if _now() >= timing_end:
                for c in pending:
                    self.case_doc(c.id).update(status="skipped", reason="skipped for time: the run's time box is spent")
                break
            pick = None
            for c in pending:
                ch = self.workers[c.worker]
                if ch.state == "dead":
                    self.case_doc(c.id).update(status="error", reason=f"worker {c.worker} exited "
                                                                      f"(exit {ch.popen.returncode}) before this case")
                    pending.remove(c)
                    pick = "again"
                    break
                if ch.state != "ready":
                    continue
                if c.op == "train":
                    others = [n for n, w in self.workers.items() if n != c.worker and w.state not in ("done", "dead")]
                    if others:
                        for n in others:
                            if not any(p.worker == n for p in pending):
                                self.quit_worker(n)
                        continue
                pick = c
                break
            if pick == "again":
                continue
            if pick is None:
                self.pump(0.5)
                continue
            remaining = timing_end - _now()
            total = sum(est[c.id] for c in pending)
            budget = max(min(remaining, 5.0), est[pick.id] * min(3.0, remaining / max(total, 1e-9)))
            deadline = _now() + budget
            latest = max(deadline, timing_end - (total - est[pick.id]))  # what the later cases do not need
            case = self.case_doc(pick.id)
            case.update(status="running", budget_s=round(budget, 1), latest_s=round(latest - self.t0, 1),
                        started_s=round(_now() - self.t0, 1),
                        concurrent=[n for n, w in self.workers.items() if w.state == "preparing"])
            ch = self.workers[pick.worker]
            try:
                ch.popen.stdin.write(json.dumps({"cmd": "time", "case": pick.id, "deadline": deadline,
                                                 "latest": latest}) + "\n")
                ch.popen.stdin.flush()
            except OSError:
                ch.state = "dead"
                continue
            ch.state = "busy"
            pending.remove(pick)
            self.write()
            while ch.state == "busy":
                if _now() >= timing_end + 5:
                    self.log(f"killing worker {pick.worker}: {pick.id} ran past the time box")
                    ch.popen.kill()
                    case.update(status="skipped", reason="skipped for time: killed when the time box ran out")
                    ch.state = "dead"
                    break
                self.pump(0.5)
            if case["status"] == "running":
                case.update(status="error", reason=f"worker {pick.worker} exited while timing this case")
        self.doc["phases"]["timing"]["end_s"] = round(_now() - self.t0, 1)
        for name, ch in self.workers.items():
            if ch.state in ("starting", "preparing", "busy"):  # nothing left for it: no need to wait
                ch.popen.kill()
            else:
                self.quit_worker(name)
        end = _now() + 10
        while any(w.state not in ("done", "dead") for w in self.workers.values()) and _now() < end:
            self.pump(0.5)
        bad = [c for c in self.doc["correctness"].values() if c.get("status") not in ("passed",)]
        errors = [c for c in self.doc["cases"] if c["status"] == "error"]
        return 1 if bad or errors else 0


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _on_signal(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a plan (gpu_run.sh calls this)")
    r.add_argument("plan", choices=sorted(PLANS))
    r.add_argument("--out", required=True, help="folder for the result files (on a lent GPU: $OUT)")
    r.add_argument("--deadline-s", type=float, default=None,
                   help="seconds from start to the last write (default: the plan's, %g s)" % HEADLINE.deadline_s)
    r.add_argument("--dry-run", action="store_true", help="the CPU rehearsal: tiny shapes, interpreter, fake device")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("plan", choices=sorted(PLANS))
    w.add_argument("--worker", required=True)
    w.add_argument("--prepare-until", type=float, required=True)
    w.add_argument("--dry-run", action="store_true")
    e = sub.add_parser("estimate", help="print each plan's time box from its case list")
    e.add_argument("plans", nargs="*", metavar="PLAN", help=f"of {', '.join(PLANS)} (default: all)")
    e.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", help="rewrite PLAN.md from PLAN.json")
    rp.add_argument("file")
    args = p.parse_args(argv)
    if args.cmd == "estimate":
        unknown = [n for n in args.plans if n not in PLANS]
        if unknown:
            p.error(f"unknown plan(s) {unknown}; choose from {', '.join(PLANS)}")
        plans = [PLANS[n] for n in (args.plans or PLANS)]
        if args.json:
            print(json.dumps([estimate(pl) for pl in plans], indent=1))
        else:
            for pl in plans:
                print("\n".join(estimate_lines(pl)))
        return 0
    if args.cmd == "report":
        try:
            with open(args.file) as f:
                doc = json.load(f)
            if doc.get("schema") != SCHEMA:
                raise ValueError(f"not a {SCHEMA} result (schema {doc.get('schema')!r})")
        except (OSError, ValueError) as ex:
            print(f"error: {args.file}: {ex}", file=sys.stderr)
            return 2
        from attnfast.train.checkpoint import atomic_write

        doc["goals"] = evaluate_goals(doc)
        md = render_markdown(doc)
        out = os.path.splitext(args.file)[0] + ".md"
        atomic_write(out, lambda f: f.write(md), mode="w")
        print(f"wrote {out}")
        return 0
    plan = PLANS[args.plan]
    if args.cmd == "worker":
        if args.dry_run:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the controller decides; a signal ends a worker at once
        worker = Worker(plan, args.worker, args.dry_run, args.prepare_until)
        worker.serve()
        return 0
    deadline = plan.deadline_s if args.deadline_s is None else args.deadline_s
    if deadline <= FINALIZE_S:
        p.error(f"--deadline-s must be more than {FINALIZE_S:g}; got {deadline:g}")
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    return Controller(plan, args.out, args.dry_run, deadline).run()


if __name__ == "__main__":
    sys.exit(main())
