"""The benchmark shapes' kernel launches, for ``python -m attnfast.kernels.aot --launches benchmarks/aot_launches.py``.

``launches()`` lists (label, callable) pairs; each callable runs one fused op forward and backward
through ``attnfast.ops`` on CPU tensors of the benchmark's shapes, dtypes and memory layouts, while
the AOT tool captures every kernel launch (``attnfast.kernels.aot.launches.capture``: Triton binds and
specializes the real arguments, then the compile and the launch are vetoed). So the captured
signatures come from the ops' own buffer allocation and the launchers' own argument lists, at the real
integer values; no kernel runs and the full-size buffers are allocated (``torch.empty``) but never
touched. What is a stand-in, not the benchmark's own code path:

- the ops take their Triton path on CPU tensors: backend ``triton`` (``attnfast.config.backend``) with the
  dispatcher told the interpreter is on (``_dispatch.interpreter_enabled``), which it is not: the kernels
  stay ``JITFunction``s, whose launches are captured (so the interpreter's bf16 refusal,
  ``_dispatch.check_interpretable``, is off);
- the grid launchers run fp32 with the dot precision they pick on CUDA under torch's defaults
  (``precision_for(dtype, "cuda")``: TF32, as cuDNN's fp32 convolutions); on CPU they would pick IEEE;
- SAGAN's q, k, v are stand-ins for the 1x1-conv outputs (``torch.empty`` in the input's memory
  format, reshaped as ``attnfast.nn.SelfAttention`` reshapes them), not computed by the convolutions;
- split counts come from the CPU path (``INTERPRETER_PROGRAMS``); they do not enter the grid binaries
  (``do_not_specialize``); CBAM's split integers are specialized (1, multiples of 16, other), so its
  captured binaries are those of the CPU split counts.

Upstream gradients are dense tensors laid out like the outputs (the benchmarks' ``randn_like``); the
grid also runs once with ``da`` absent (AttnVGG trains on the pooled features only: a stride-0 zero).
"""
import contextlib

import torch

import attnfast._alloc
import attnfast._dispatch as dispatch
import attnfast.config
from attnfast.kernels import grid_attention as G
from attnfast.nn.cbam import CBAM
from attnfast.nn.grid_attention import GridAttention
from attnfast.ops.residual_gate import residual_gate
from attnfast.ops.self_attention import self_attention

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
# (name, C_l, H = W of l, C_g, up_factor) of AttnVGG's attention blocks (test_bench_grid_attention.py), A = 256
GRID = [("pool3@224", 256, 28, 512, 4), ("pool3@512", 256, 64, 512, 4),
        ("pool4@224", 512, 14, 512, 2), ("pool4@512", 512, 32, 512, 2)]
GRID_A = 256
GRID_BATCHES = (8, 64)
SAGAN_C, SAGAN_SIDES, SAGAN_B = 128, (64, 128, 256), 8  # N = 4096, 16384, 65536 (test_bench_self_attention.py)
CBAM_STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # ResNet-50 stages (test_bench_cbam.py)
CBAM_BATCHES = (32, 64)
GATE_SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14)]  # test_bench_residual_gate.py
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@contextlib.contextmanager
def _triton_path_on_cpu():
    old_fill, old_interp, old_prec = attnfast._alloc.NAN_FILL, dispatch.interpreter_enabled, G.precision_for
    old_refuse = dispatch.check_interpretable
    attnfast._alloc.NAN_FILL = False  # a NaN fill would write every full-size buffer
    dispatch.interpreter_enabled = lambda: True
    # the launches are captured, never interpreted: bf16 is no interpreter arithmetic here
    dispatch.check_interpretable = lambda tensors: None
    G.precision_for = lambda dtype, device=None: old_prec(dtype, "cuda")
    try:
        with attnfast.config.backend("triton"):
            yield
    finally:
        attnfast._alloc.NAN_FILL, dispatch.interpreter_enabled, G.precision_for = old_fill, old_interp, old_prec
        dispatch.check_interpretable = old_refuse


def _empty(shape, dtype, layout="nchw", grad=True):
    return torch.empty(shape, dtype=dtype, memory_format=LAYOUTS[layout]).requires_grad_(grad)


def _backward(outs):
    outs = [o for o in outs if o.requires_grad]
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _grid(B, C, H, Cg, up, dtype, layout, with_da):
    def run():
        module = GridAttention(C, Cg, GRID_A, up, normalize_attn=True).to(dtype=dtype, memory_format=LAYOUTS[layout])
        l, g = _empty((B, C, H, H), dtype, layout), _empty((B, Cg, H // up, H // up), dtype, layout)
        with _triton_path_on_cpu():
            a, pooled = module(l, g)
            _backward([a, pooled] if with_da else [pooled])
    return run


def _sagan(side, dtype, layout):
    B, C, D, N = SAGAN_B, SAGAN_C, SAGAN_C // 8, side * side

    def conv_out(ch):  # a 1x1 conv's output keeps its input's memory format
        return _empty((B, ch, side, side), dtype, layout).reshape(B, ch, N)

    def run():
        q, k, v, x = conv_out(D), conv_out(D), conv_out(C), conv_out(C)
        gamma = torch.zeros(1, dtype=dtype, requires_grad=True)
        with _triton_path_on_cpu():
            _backward([self_attention(q, k, v, x, gamma, D ** -0.5)])
    return run


def _cbam(B, C, side, dtype, layout):
    def run():
        module = CBAM(C).to(dtype=dtype, memory_format=LAYOUTS[layout]).train()
        with _triton_path_on_cpu():
            _backward([module(_empty((B, C, side, side), dtype, layout))])
    return run


def _gate(shape, dtype, layout):
    def run():
        with _triton_path_on_cpu():
            _backward([residual_gate(_empty(shape, dtype, layout), _empty(shape, dtype, layout))])
    return run


def launches() -> list:
    out = []
    for dt, dtype in DTYPES.items():
        for layout in LAYOUTS:
            for name, C, H, Cg, up in GRID:
                for B in GRID_BATCHES:
                    out.append((f"grid {name} B={B} {dt} {layout}", _grid(B, C, H, Cg, up, dtype, layout, True)))
                out.append((f"grid {name} B=8 {dt} {layout} no-da", _grid(8, C, H, Cg, up, dtype, layout, False)))
            for side in SAGAN_SIDES:
                out.append((f"sagan C={SAGAN_C} N={side * side} B={SAGAN_B} {dt} {layout}", _sagan(side, dtype, layout)))
            for C, side in CBAM_STAGES:
                for B in CBAM_BATCHES:
                    out.append((f"cbam C={C} {side}x{side} B={B} {dt} {layout}", _cbam(B, C, side, dtype, layout)))
            for shape in GATE_SHAPES:
                out.append((f"ran-gate {'x'.join(map(str, shape))} {dt} {layout}", _gate(shape, dtype, layout)))
    return out
