"""Registry of every Triton kernel configuration attnfast can launch, and its AOT compiler.

Each kernel module of ``attnfast.kernels`` defines ``aot_configs() -> list[KernelConfig]`` listing every
configuration its launch functions can choose (dtypes, block sizes, warps, stages, constexpr
switches). ``compile_config`` compiles one for a CUDA compute capability on a machine without a
GPU (``triton.compile`` with a ``GPUTarget``) and reads from the compiled code (cubin, SASS, PTX,
TTGIR; see ``asm``) registers, spills, shared memory, resident blocks per SM, MMA instructions and
atomics. A config may carry the specialization attributes of a captured launch (``attrs``, see
``launches``): it then compiles the binary that launch runs. Run ``python -m attnfast.kernels.aot``
for the table; the test suite runs it in a subprocess (the kernels must be real ``JITFunction``s,
not the interpreter's). Only the AOT tooling and the tests import this package, never a launcher.
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

@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launchable configuration of one kernel (``attrs`` empty), or one binary of it as a launch
    specializes it (``attrs``/``base``/``spec``/``launches`` set by ``launches.launch_configs``)."""

    name: str  # unique, human-readable: "module.kernel[dtype,BLOCK=...]" (launch binaries: "...@<hash>")
    kernel: Callable  # the @triton.jit function
    signature: dict  # arg name -> triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr arg name (or Triton's arg path) -> value
    num_warps: int = 4
    num_stages: int = 3
    max_spill_bytes: int | None = None  # None: the budget table (``budgets.spill_budget``); fixtures override
    max_regs: int = 255
    attrs: dict = dataclasses.field(default_factory=dict)  # Triton arg path -> [["tt.divisibility", 16]]
    base: str = ""  # launch binaries: the registered config they specialize (its budgets apply)
    spec: str = ""  # launch binaries: what the launch specialized, readable (see ``launches.describe``)
    launches: tuple = ()  # launch binaries: labels of the captured launches that run this binary

    @property
    def budget_name(self) -> str:
        """The configuration whose budgets apply: the registered one a launch binary specializes."""
        return self.base or self.name


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
    """The kernel modules of ``attnfast.kernels`` (not this tooling, not private helpers)."""
    pkg = importlib.import_module(__package__.rsplit(".", 1)[0])
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        names.append(f"{pkg.__name__}.{info.name}")
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


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_triton_bin("cuobjdump"), *flags, path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED (static) / LOCAL from ``cuobjdump --dump-resource-usage``."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else 0
    return usage


def ptxas_path(cap: int) -> str:
    """The ptxas Triton uses for compute capability ``cap``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(cap).path
        except TypeError:  # older triton: get_ptxas() takes no argument
            return get_ptxas().path
    except Exception:
        return _triton_bin("ptxas")


def ptxas_version(cap: int) -> str:
    """Release of the ptxas Triton uses for ``cap`` (e.g. ``12.9.86``)."""
    out = subprocess.run([ptxas_path(cap), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def _compile(cfg: KernelConfig, cap: int):
    """``triton.compile`` for ``cap``, capturing the ptxas ``-v`` log Triton prints when asked
    (empty when the kernel came from Triton's cache)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=cfg.kernel, signature=dict(cfg.signature),
                                    constexprs=dict(cfg.constexprs), attrs=dict(cfg.attrs) or None)
    knobs = getattr(triton, "knobs", None)
    nvidia = getattr(knobs, "nvidia", None)
    log = io.StringIO()
    old = getattr(nvidia, "dump_ptxas_log", None)
    try:
        if nvidia is not None:
            nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    finally:
        if nvidia is not None:
            nvidia.dump_ptxas_log = old
    return compiled, log.getvalue()


def compile_config(cfg: KernelConfig, cap: int) -> dict:
    """Compile ``cfg`` for compute capability ``cap`` (80, 90, ...) without a GPU and read its
    static evidence (see ``asm``): registers, spills, shared memory, resident blocks per SM, the
    MMA family and work per warp, atomics; with its budgets (``budgets``).

    Spills are ptxas's ``bytes spill stores`` + ``bytes spill loads`` from the log of the ptxas run
    that built the cubin (Triton prints it on request). When the kernel came from Triton's cache there
    is no log: then they are the bytes of the SASS's local stores and loads (``STL``/``LDL``; none
    without a stack frame), the same figure (see ``asm.sass_spill_bytes``), at the price of a
    disassembly.
    """
    from .. import _launch
    from . import asm, budgets

    compiled, log = _compile(cfg, cap)
    cubin, ptx, ttgir = compiled.asm["cubin"], compiled.asm["ptx"], compiled.asm["ttgir"]
    usage = _resource_usage(cubin)
    stack = usage["STACK"] + usage["LOCAL"]
    spills = asm.ptxas_log_spill_bytes(log)
    if spills is None:
        spills = asm.sass_spill_bytes(_cuobjdump(cubin, "--dump-sass")) if stack else 0
    dynamic = int(compiled.metadata.shared)
    shared = dynamic + usage["SHARED"]
    kernel = getattr(cfg.kernel, "fn", cfg.kernel)
    budget = cfg.max_spill_bytes if cfg.max_spill_bytes is not None else budgets.spill_budget(cfg.budget_name, cap)
    out = {"name": cfg.name, "cap": cap, "kernel": f"{kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}",
           "regs": usage["REG"], "spill_bytes": spills,
           "stack_bytes": stack, "shared_bytes": shared, "dynamic_shared_bytes": dynamic,
           "blocks_per_sm": _launch.blocks_per_sm(usage["REG"], shared, cfg.num_warps, cap),
           "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
           "max_spill_bytes": budget, "max_regs": cfg.max_regs,
           "mma": asm.mma_evidence(asm.ttgir_dots(ttgir), asm.ptx_mmas(ptx), cfg.num_warps),
           "atomics": asm.ptx_atomics(ptx)}
    if cfg.base:
        out.update(base=cfg.base, spec=cfg.spec, launches=list(cfg.launches))
    return out
