"""Registry of every Triton kernel configuration attnfast can launch, and its AOT compiler.

Each kernel module in this package defines ``aot_configs() -> list[KernelConfig]`` listing every
configuration its launch functions can choose (dtypes, block sizes, warps, stages, constexpr
switches). ``compile_config`` compiles one for a CUDA compute capability on a machine without a
GPU (``triton.compile`` with a ``GPUTarget``) and reads registers, spills and shared memory from
the cubin. Run ``python -m attnfast.kernels.aot`` for a report; the test suite runs it in a
subprocess (the kernels must be real ``JITFunction``s, not the interpreter's).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import tempfile
from typing import Callable

TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                   "torch.float64": "fp64", "torch.int32": "i32", "torch.int64": "i64"}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launchable configuration of one kernel."""

    name: str  # unique, human-readable: "module.kernel[dtype,BLOCK=...]"
    kernel: Callable  # the @triton.jit function
    signature: dict  # arg name -> triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    max_spill_bytes: int = 0  # budget: more spilled bytes than this fails the AOT test
    max_regs: int = 255


def arg_names(kernel) -> list:
    fn = getattr(kernel, "fn", kernel)
    return list(inspect.signature(fn).parameters)


def signature(kernel, *, ptrs: dict, scalars: dict | None = None, constexprs: dict) -> dict:
    """Build a triton signature: pointer args from ``ptrs`` (name -> 'fp16'), scalar args from
    ``scalars`` (name -> 'fp32'/'i64'), constexprs as 'constexpr', every other arg 'i32'."""
    scalars = scalars or {}
    sig = {}
    for name in arg_names(kernel):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in scalars:
            sig[name] = scalars[name]
        else:
            sig[name] = "i32"
    missing = set(ptrs) | set(scalars) | set(constexprs)
    missing -= set(sig)
    if missing:
        raise ValueError(f"{kernel}: unknown argument(s) {sorted(missing)}")
    return sig


def kernel_modules() -> list:
    pkg = importlib.import_module(__package__)
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in ("registry", "aot"):
            continue
        names.append(f"{__package__}.{info.name}")
    return sorted(names)


def all_configs() -> list:
    configs = []
    for modname in kernel_modules():
        mod = importlib.import_module(modname)
        fn = getattr(mod, "aot_configs", None)
        if fn is not None:
            configs.extend(fn())
    names = [c.name for c in configs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate kernel config names: {sorted(dup)}")
    return configs


def _triton_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL / SHARED from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else 0
    return usage


def _ptxas_spills(ptx: str, cap: int) -> int | None:
    """Spill bytes (stores + loads) reported by ``ptxas -v`` with Triton's own ptxas."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(cap).path
        except TypeError:  # older triton: get_ptxas() takes no argument
            ptxas = get_ptxas().path
    except Exception:
        ptxas = _triton_bin("ptxas")
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        path = f.name
    try:
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
                           capture_output=True, text=True)
    finally:
        os.unlink(path)
    text = r.stdout + r.stderr
    if r.returncode != 0:  # a silent fallback could hide spills: fail loudly
        raise RuntimeError(f"ptxas -v failed for sm_{cap} (exit {r.returncode}): {text.strip()[-500:]}")
    stores = re.findall(r"(\d+) bytes spill stores", text)
    loads = re.findall(r"(\d+) bytes spill loads", text)
    if not stores and not loads:
        return None
    return sum(map(int, stores)) + sum(map(int, loads))


def compile_config(cfg: KernelConfig, cap: int) -> dict:
    """Compile ``cfg`` for compute capability ``cap`` (80, 90, ...) without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=cfg.kernel, signature=dict(cfg.signature),
                                    constexprs=dict(cfg.constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    usage = _resource_usage(compiled.asm["cubin"])
    # Always ask ptxas: the cubin's STACK/LOCAL can read 0 for a kernel that spills.
    spills = _ptxas_spills(compiled.asm["ptx"], cap)
    if spills is None:  # fall back to local memory use from the cubin
        spills = usage["LOCAL"]
    return {"name": cfg.name, "cap": cap, "regs": usage["REG"], "spill_bytes": spills,
            "local_bytes": usage["LOCAL"], "shared_bytes": compiled.metadata.shared,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "max_spill_bytes": cfg.max_spill_bytes, "max_regs": cfg.max_regs}
