"""The binaries that launches really run: capture kernel launches on CPU tensors, as Triton would
specialize them on a GPU, and turn them into configurations to compile.

At launch, Triton specializes the arguments (``triton/runtime/jit.py``: ``create_function_from_signature``
and ``BaseBackend.get_int_specialization`` / ``get_tensor_specialization`` in triton 3.6 to 3.9): an
integer argument equal to 1 becomes a compile-time constant, an integer divisible by 16 and a pointer
aligned to 16 bytes get ``tt.divisibility = 16``, except the arguments named in ``do_not_specialize``.
The binary (vector widths, registers, spills) depends on that, so the plain build of a registered
configuration (every integer a plain ``i32``) is not what runs.

``capture(fn)`` runs ``fn`` (anything that calls attnfast's launchers on CPU tensors of the real
shapes and layouts; ``torch.empty`` buffers are allocated but never read or written here) and
records what Triton would compile at each launch, through Triton's own launch path:
``JITFunction.run`` binds and specializes the arguments, then calls ``knobs.runtime.jit_cache_hook``
before compiling; the hook records the signature, constants and attributes and vetoes the compile and
the launch. A stand-in driver answers Triton's device queries (device, stream, target), as no GPU is
present. Pointer alignment comes from the CPU allocator (64-byte aligned blocks; CUDA's caching
allocator's are 512-byte aligned, both multiples of 16) and from views' offsets, which are the same
on CUDA. The specialization does not depend on the target (the CUDA backend does not override those
rules; ``capture`` checks it), so one capture serves sm_80 and sm_90.

``launch_configs`` matches each launch to the registered configuration with the same kernel,
constexprs, warps, stages and argument types (a launch that matches none is reported), and returns
one ``KernelConfig`` per distinct binary, named ``<registered name>@<hash of its specialization>``,
carrying the specialization (``describe``) and the labels of the launches that run it.
"""
from __future__ import annotations

import dataclasses
import hashlib

from .registry import KernelConfig

_DEVICE = -1  # the stand-in device's index: a key of JITFunction.device_caches no real device uses


@dataclasses.dataclass(frozen=True)
class Launch:
    """One captured launch: what Triton would compile for it."""

    kernel: object  # the JITFunction
    signature: dict  # arg name -> type ("*bf16", "i32", "fp32", "constexpr")
    constants: dict  # arg name -> value: declared constexprs and integers specialized to 1
    attrs: dict  # Triton arg path -> [["tt.divisibility", 16]] or []
    num_warps: int
    num_stages: int
    label: str = ""


class _StandInDriver:
    """Answers the device queries ``JITFunction.run`` makes before it compiles."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return _DEVICE

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _check_target_independent():
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend

    for name in ("get_int_specialization", "get_tensor_specialization", "parse_attr"):
        if getattr(CUDABackend, name, None) is not getattr(BaseBackend, name, None):
            raise RuntimeError(f"this triton's CUDA backend overrides {name}: the launch specialization may "
                               "depend on the target; capture per target before trusting one capture for all")


def capture(fn, label: str = "", cap: int = 90) -> list:
    """Run ``fn()`` with every Triton launch recorded instead of compiled and launched; returns the
    ``Launch``es in order (``label`` on each)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    _check_target_independent()
    records, kernels = [], set()

    def hook(*, fn, compile, **_):
        jit = fn.jit_function
        names = jit.arg_names
        kernels.add(jit)
        records.append(Launch(
            kernel=jit, signature=dict(compile["signature"]),
            constants={names[path[0]]: value for path, value in compile["constants"].items()},
            attrs=dict(compile["configs"][0]), num_warps=compile["num_warps"], num_stages=compile["num_stages"],
            label=label))
        return True  # handled: no compile, no launch

    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(_StandInDriver(GPUTarget("cuda", cap, 32)))
    try:
        fn()
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver.set_active(old_driver)
        for jit in kernels:  # the stand-in target's binder must not outlive the capture
            jit.device_caches.pop(_DEVICE, None)
    return records


# ----------------------------------------------------------------------------------------------
# launches -> configurations
# ----------------------------------------------------------------------------------------------
def _is_int(ty: str) -> bool:
    return ty in ("i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64")


def _types_agree(registered: str, launched: str, value) -> bool:
    """The launch passes what the registered config declares: the same type, or an integer
    specialized to the constant 1."""
    return registered == launched or (launched == "constexpr" and _is_int(registered) and value == 1)


def matches(cfg: KernelConfig, launch: Launch) -> bool:
    """Whether ``launch`` runs a specialization of the registered ``cfg``."""
    fn = getattr(cfg.kernel, "fn", cfg.kernel)
    if getattr(launch.kernel, "fn", launch.kernel) is not fn:
        return False
    if (cfg.num_warps, cfg.num_stages) != (launch.num_warps, launch.num_stages):
        return False
    if any(launch.constants.get(k, object()) != v for k, v in cfg.constexprs.items()):
        return False
    return set(cfg.signature) == set(launch.signature) and all(
        _types_agree(ty, launch.signature[n], launch.constants.get(n)) for n, ty in cfg.signature.items())


def describe(launch: Launch, cfg: KernelConfig) -> str:
    """What the launch specialized beyond ``cfg``: integers that became the constant 1, arguments
    with the 16-divisibility hint, and integers / pointers without it."""
    names = launch.kernel.arg_names
    hinted = {names[p[0]] for p, a in launch.attrs.items() if ["tt.divisibility", 16] in [list(x) for x in a]}
    ones = [n for n, ty in launch.signature.items() if ty == "constexpr" and n not in cfg.constexprs]
    div = [n for n in names if n in hinted]
    plain = [n for n, ty in launch.signature.items()
             if (ty.startswith("*") or _is_int(ty)) and n not in hinted]
    return f"=1: {' '.join(ones) or '-'}; %16: {' '.join(div) or '-'}; neither: {' '.join(plain) or '-'}"


def launch_configs(launches: list, registered: list) -> tuple:
    """(configs, unmatched): one ``KernelConfig`` per distinct binary the launches run, in the order
    first seen, and a message per launch that matches no registered configuration."""
    out, unmatched = {}, []
    for launch in launches:
        found = [c for c in registered if not c.base and matches(c, launch)]
        if len(found) != 1:
            kname = getattr(launch.kernel, "__name__", "?")
            unmatched.append(f"{launch.label}: {kname} launch (warps {launch.num_warps}, stages {launch.num_stages}, "
                             f"constants {launch.constants}) matches {len(found)} registered configurations "
                             f"{[c.name for c in found]}")
            continue
        base = found[0]
        spec = describe(launch, base)
        name = f"{base.name}@{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
        if name in out:
            if launch.label not in out[name].launches:
                out[name] = dataclasses.replace(out[name], launches=out[name].launches + (launch.label,))
            continue
        out[name] = KernelConfig(
            name=name, kernel=base.kernel, signature=dict(launch.signature), constexprs=dict(launch.constants),
            num_warps=launch.num_warps, num_stages=launch.num_stages, max_spill_bytes=base.max_spill_bytes,
            max_regs=base.max_regs, attrs=dict(launch.attrs), base=base.name, spec=spec, launches=(launch.label,))
    return list(out.values()), unmatched
