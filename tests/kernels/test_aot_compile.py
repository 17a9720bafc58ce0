"""Kernel harness: every registered Triton configuration compiles for sm_80 and sm_90 on the CPU.

The compile is the session's one AOT run (``aot_report`` in this folder's conftest), in a subprocess
without TRITON_INTERPRET. It fails on any compile error, on register spills beyond a configuration's
budget, on registers or shared memory beyond the limits, or on a config that cannot launch.
"""
import ast
import os
import subprocess
import sys

import attnfast.kernels as kernels_pkg

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
    from attnfast.kernels.registry import all_configs, kernel_modules

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
