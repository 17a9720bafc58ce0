"""Kernel harness: every registered Triton configuration compiles for sm_80 and sm_90 on the CPU, and
so does every binary the benchmark shapes' launches run.

The compile is the session's one AOT run (``aot_report`` in this folder's conftest), in a subprocess
without TRITON_INTERPRET. It fails on any compile error, on register spills beyond a configuration's
budget (``attnfast.kernels.aot.budgets``), on registers or shared memory beyond the limits, on a
config that cannot launch, or on a captured launch that matches no registered configuration.
"""
import ast
import json
import os
import subprocess
import sys

import pytest

import attnfast.kernels as kernels_pkg
from attnfast.kernels.aot import budgets

KERNEL_DIR = os.path.dirname(kernels_pkg.__file__)


def test_every_config_compiles_without_spills(aot_report):
    assert not aot_report["failures"], "\n".join(aot_report["failures"]) + "\n" + aot_report["log"]
    assert aot_report["returncode"] == 0, aot_report["log"]


def test_both_architectures_for_every_config(aot_report):
    caps = {}
    for r in aot_report["results"]:
        caps.setdefault(r["name"], set()).add(r["cap"])
    assert caps, "no kernel configuration registered"
    missing = {n: c for n, c in caps.items() if c != {80, 90}}
    assert not missing, f"configs not compiled for both sm_80 and sm_90: {missing}"


def _jit_kernels_in(path):
    """Names of @triton.jit functions whose name ends in '_kernel' (launchable entry points)."""
    tree = ast.parse(open(path).read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
            for d in node.decorator_list:
                src = ast.unparse(d)
                if "jit" in src or "autotune" in src or "heuristics" in src:
                    names.append(node.name)
                    break
    return names


def test_registry_covers_every_kernel():
    """Every launchable kernel (``*_kernel``) in kernels/ has at least one registered configuration."""
    from attnfast.kernels.aot.registry import all_configs, kernel_modules

    registered = {getattr(c.kernel, "__name__", None) or c.kernel.fn.__name__ for c in all_configs()}
    registered |= {getattr(getattr(c.kernel, "fn", None), "__name__", "") for c in all_configs()}
    missing = []
    for mod in kernel_modules():
        path = os.path.join(KERNEL_DIR, mod.rsplit(".", 1)[1] + ".py")
        for name in _jit_kernels_in(path):
            if name not in registered:
                missing.append(f"{mod}.{name}")
    assert not missing, f"kernels without a registered AOT configuration: {missing}"


def test_aot_refuses_interpreter(aot_env):
    env = dict(aot_env)
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-m", "attnfast.kernels.aot", "--filter", "residual_gate"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr


def test_every_launch_binary_is_a_registered_config(aot_report, launch_results, results_by_config):
    """The captured benchmark launches ran (the AOT run reports launches that match no registered
    configuration as failures) and reached the grid, self-attention, CBAM and residual-gate kernels;
    a configuration they reach has no plain build in the report (its launch binaries replace it)."""
    assert launch_results, "no launch binary in the AOT report: were the benchmark launches captured?"
    kernels = {r["base"].split("[")[0] for r in launch_results.values()}
    for family in ("grid_attention.fwd", "grid_attention.bwd", "grid_attention.bwd_weight", "self_attention.fwd",
                   "self_attention.bwd_dkdv", "cbam.cbam_gate_kernel", "residual_gate.fwd_dense"):
        assert family in kernels, f"no captured launch of {family}: {sorted(kernels)}"
    plain_and_launched = [c for c, rows in results_by_config.items()
                          if any(r.get("base") for r in rows) and any(not r.get("base") for r in rows)]
    assert not plain_and_launched, plain_and_launched[:5]
    assert not [f for f in aot_report["failures"] if "matches no registered" in f]


def test_budgets_are_the_envelope_of_the_measured_tritons():
    """One table; a budget is the largest spill measured for its configuration and target under any
    measured triton, every measured triton is listed for every entry, and a listed configuration spilled
    somewhere (else it would not be listed)."""
    for name, rows in budgets.SPILLS.items():
        assert set(rows) == set(budgets.MEASURED_TRITONS), name
        assert any(b for row in rows.values() for b in row), f"{name}: listed but never spilled"
        for i, cap in enumerate(budgets.CAPS):
            assert budgets.spill_budget(name, cap) == max(row[i] for row in rows.values())
    assert budgets.spill_budget("no.such[config]", 90) == 0
    from attnfast.kernels.aot.registry import all_configs

    stale = set(budgets.SPILLS) - {c.name for c in all_configs()}
    assert not stale, f"budgets for configurations that no longer exist: {sorted(stale)}"


def test_over_budget_message_says_how_to_remeasure():
    msg = budgets.over_budget_advice("self_attention.fwd[bf16,D=128,DV=128]", 90)
    assert "python -m attnfast.kernels.aot --filter" in msg and "budgets.py" in msg and "MEASURED_TRITONS" in msg


def test_no_launcher_imports_the_aot_tooling():
    """The runtime path (the kernel modules and their helpers) never imports ``attnfast.kernels.aot``:
    only ``aot_configs`` (and the config builders it calls) import the registry, when called."""
    code = ("import sys, attnfast.kernels.grid_attention, attnfast.kernels.self_attention, attnfast.kernels.cbam, "
            "attnfast.kernels.residual_gate; print(sorted(m for m in sys.modules if m.startswith('attnfast.kernels.aot')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


@pytest.mark.parametrize("fusion", [None, "1"])
def test_aot_writes_its_report_with_or_without_the_fp_fusion_variable(aot_env, tmp_path, fusion):
    """A one-config run writes the JSON whether TRITON_DEFAULT_FP_FUSION is set or not (unset, the
    report header used to raise KeyError after all the compiles), and names the variable when set."""
    env = {k: v for k, v in aot_env.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    if fusion is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = fusion
    out = tmp_path / "one.json"
    r = subprocess.run([sys.executable, "-m", "attnfast.kernels.aot", "--filter", "residual_gate.fwd_dense[fp32",
                        "--caps", "80", "--jobs", "1", "--json", str(out)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [x["name"] for x in report["results"]] == ["residual_gate.fwd_dense[fp32,BLOCK=1024]"]
    assert ("TRITON_DEFAULT_FP_FUSION=1" in report["header"]["command"]) == (fusion is not None)
