"""First contact with a GPU: every attnfast kernel once at the models' real shapes, against float64, as JSON.

    python benchmarks/gpu_smoke.py [--out-dir DIR | --out FILE] [--dtypes bf16,fp32,fp16] [--ops OP,...]
                                   [--budget-s 100] [--tiny]

For each op (grid attention, SAGAN self-attention, residual gate, and CBAM where ``attnfast.nn.cbam``
exists) and dtype, one forward and one backward through the Triton kernels, compared with the same
module in float64 (computed on the same device) by the three-way rule of ``attnfast.testing``: error
<= 2 x eager PyTorch's error in that dtype + a small atol. The result goes to
``DIR/gpu_smoke_<device>.json`` (default DIR: $RESULTS_DIR or benchmarks/results) or to ``--out FILE``,
rewritten atomically after every case, so a run cut short keeps what it did. ``--ops`` keeps only the
named ops (grid_attention, self_attention, residual_gate, cbam). ``benchmarks/gpu_run.sh headline``
runs it on the GPU beside ``tests/gpu``. Exit status: 0 all passed, 1 a check failed
or a case raised, 2 bad usage.

JSON: ``schema``, ``device``, ``torch``, ``triton``, ``python``, ``cuda``, ``date``, ``started_utc``,
``finished_utc`` (null until the end), ``complete``, ``pass``, ``settings`` (mode, backend, TF32, budget)
and ``results``: one entry per (op, case, dtype) with ``shape``, ``seconds``, ``pass``, ``error`` (if it
raised), ``kernels`` (per kernel: ``forward`` = the outputs, ``backward`` = every gradient: the largest
``max_err`` vs float64, eager's ``eager_max_err`` for that output, ``pass``) and ``checks`` (every output
and gradient with its three-way message). Cases past ``--budget-s`` are listed with ``skipped``.

On CUDA fp32 runs with TF32 off (IEEE in eager PyTorch and in the kernels), and a fall-back to the
PyTorch path counts as a failure. ``--tiny``: small shapes, on the CPU through the Triton interpreter
when there is no GPU (fp32 and fp16 only: the interpreter's bf16 arithmetic is wrong); this is how CI
runs the script end to end.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

DTYPE_NAMES = ("bf16", "fp32", "fp16")  # default order: the training dtype first
OPS = ("grid_attention", "self_attention", "residual_gate", "cbam")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.environ.get("RESULTS_DIR") or "benchmarks/results",
                   help="folder for gpu_smoke_<device>.json (default: $RESULTS_DIR or benchmarks/results)")
    p.add_argument("--out", default=None, help="write the JSON to this file instead (overrides --out-dir)")
    p.add_argument("--ops", default=None, help="comma-separated ops to run (default: all)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated from bf16, fp32, fp16 (default: all three on CUDA, fp32,fp16 on CPU)")
    p.add_argument("--budget-s", type=float, default=100.0,
                   help="start no new case after this many seconds (default 100: the whole run stays "
                        "under 2 minutes with startup)")
    p.add_argument("--tiny", action="store_true",
                   help="small shapes; without a GPU, on the CPU through the Triton interpreter")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive; got {args.budget_s}")
    for flag, allowed in (("dtypes", DTYPE_NAMES), ("ops", OPS)):
        value = getattr(args, flag)
        if value is not None:
            names = [d.strip() for d in value.split(",") if d.strip()]
            if not names or any(d not in allowed for d in names):
                p.error(f"--{flag} must be a comma-separated subset of {','.join(allowed)}; got {value!r}")
            setattr(args, flag, names)
    return args, p


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    # Before attnfast.kernels is imported: the interpreter for a CPU run, NaN-poisoned output buffers always.
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.tiny:
            parser.error("no CUDA device: the real shapes need a GPU (use --tiny for a CPU run through the "
                         "Triton interpreter)")
        os.environ["TRITON_INTERPRET"] = "1"
    import attnfast._alloc
    import attnfast.config

    attnfast.config.set_backend("triton" if not cuda else "auto")
    attnfast._alloc.NAN_FILL = True  # every output buffer starts as NaN: an unwritten element fails
    dtypes = args.dtypes or (list(DTYPE_NAMES) if cuda else ["fp32", "fp16"])
    if not cuda and "bf16" in dtypes:
        parser.error("bf16 needs a GPU: the Triton interpreter's bf16 arithmetic is wrong")
    smoke = Smoke(args, dtypes, "cuda" if cuda else "cpu")
    return smoke.run()


def _nan_fill() -> bool:
    import attnfast._alloc

    return bool(attnfast._alloc.NAN_FILL)


class Smoke:
    def __init__(self, args, dtype_names, device):
        import torch

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness.py, also under python -P
        import harness

        self.torch = torch
        self.device = device
        self.dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
        self.dtype_names = dtype_names
        self.budget = args.budget_s
        info = dict(harness.device_info())
        slug = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in info["device"]).strip("_")[:60]
        self.path = args.out or os.path.join(args.out_dir, f"gpu_smoke_{slug}{'_tiny' if args.tiny else ''}.json")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.doc = {"schema": "attnfast.gpu_smoke/1", **info, "started_utc": now.isoformat(timespec="seconds"),
                    "finished_utc": None, "complete": False, "pass": None,
                    "settings": {"mode": "tiny" if args.tiny else "real", "device": device,
                                 "backend": "triton (compiled)" if device == "cuda" else "triton (interpreter)",
                                 "tf32": False, "nan_fill": _nan_fill(),
                                 "budget_s": self.budget, "dtypes": dtype_names, "ops": args.ops,
                                 "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])},
                    "results": []}
        self.cases = [c for c in (tiny_cases() if args.tiny else real_cases()) if args.ops is None or c.op in args.ops]

    def save(self):
        import json

        from attnfast.train.checkpoint import atomic_write

        atomic_write(self.path, lambda f: json.dump(self.doc, f, indent=1), mode="w")

    def run(self) -> int:
        torch = self.torch
        if self.device == "cuda":
            torch.backends.cudnn.allow_tf32 = False  # legacy flags only, both: fp32 is IEEE fp32
            torch.backends.cuda.matmul.allow_tf32 = False
        t0 = time.perf_counter()
        self.save()
        for dname in self.dtype_names:
            for case in self.cases:
                entry = {"op": case.op, "case": case.name, "dtype": str(self.dtypes[dname]), "shape": case.shape}
                if time.perf_counter() - t0 > self.budget:
                    entry.update(skipped=f"time budget of {self.budget:g} s spent", **{"pass": None})
                elif case.unavailable():
                    entry.update(skipped=case.unavailable(), **{"pass": None})
                else:
                    entry.update(self.run_case(case, self.dtypes[dname]))
                self.doc["results"].append(entry)
                self.save()
                status = "skipped" if entry.get("skipped") else ("PASS" if entry["pass"] else "FAIL")
                print(f"[{time.perf_counter() - t0:6.1f} s] {status:7s} {case.op} {case.name} {dname} "
                      f"{entry.get('seconds', '')}", flush=True)
        ran = [r for r in self.doc["results"] if not r.get("skipped")]
        self.doc["pass"] = bool(ran) and all(r["pass"] for r in ran)
        self.doc["complete"] = len(ran) == len(self.doc["results"])
        self.doc["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.save()
        failed = [f"{r['op']} {r['case']} {r['dtype']}" for r in ran if not r["pass"]]
        print(f"{self.path}: {len(ran)} cases run, {len(failed)} failed, "
              f"{len(self.doc['results']) - len(ran)} skipped" + (f": {failed}" if failed else ""))
        return 0 if self.doc["pass"] else 1

    def run_case(self, case, dtype) -> dict:
        import traceback
        import warnings

        from attnfast import _dispatch

        torch = self.torch
        _dispatch._WARNED.clear()  # a fall-back warns once per reason: make this case's visible
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                checks = case.check(self.device, dtype)
            if self.device == "cuda":
                torch.cuda.synchronize()
            fallbacks = [str(w.message) for w in caught if "using the PyTorch path" in str(w.message)]
        except Exception as e:  # a kernel that fails to compile or launch is a result, not the end
            return {"pass": False, "seconds": round(time.perf_counter() - start, 3),
                    "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()
        kernels = {}
        for c in checks:
            k = kernels.setdefault(c["kernel"], {"max_err": 0.0, "eager_max_err": 0.0, "worst": None, "pass": True})
            if c["max_err"] >= k["max_err"]:
                k.update(max_err=c["max_err"], eager_max_err=c["eager_max_err"], worst=c["name"])
            k["pass"] = k["pass"] and c["pass"]
        res = {"pass": all(c["pass"] for c in checks) and not fallbacks,
               "seconds": round(time.perf_counter() - start, 3), "kernels": kernels, "checks": checks}
        if fallbacks:
            res["error"] = "ran the PyTorch path instead of the kernels: " + "; ".join(fallbacks)
        return res


# ----------------------------------------------------------------------------------------------
# cases: a float64 module, eager and fused copies with its weights, forward + backward of all three
# ----------------------------------------------------------------------------------------------
class Case:
    """One op at one shape. ``make()`` -> (reference module, fused module) with the same weights and
    parameter names; ``inputs``: the input shapes; the first ``outputs`` outputs are compared (the seed's
    SAGAN layer also returns its attention matrix); ``special``: name -> ``f(reference outputs and grads,
    inputs, float64 module) -> (factor, scale)`` for a gradient compared at the scale of what it sums
    rather than its own value; ``needs``: a module that must be importable."""

    def __init__(self, op, name, shape, make, inputs, outputs=1, special=None, needs=None):
        self.op, self.name, self.shape = op, name, shape
        self.make, self.inputs, self.outputs = make, inputs, outputs
        self.special = special or {}
        self.needs = needs

    def unavailable(self):
        if self.needs is None:
            return None
        try:
            __import__(self.needs)
        except ImportError as e:
            return f"{self.needs} is not importable here ({e})"
        return None

    def check(self, device, dtype) -> list:
        import torch

        from attnfast.testing import BASE_ATOL, max_abs_err, three_way_check

        torch.manual_seed(0)
        ref, fused = self.make()
        ref64 = ref.double().to(device)
        eager = self.make()[0].to(device=device, dtype=dtype)
        eager.load_state_dict(ref64.state_dict())
        fused = fused.to(device=device, dtype=dtype)
        fused.load_state_dict(ref64.state_dict())
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in self.inputs]

        def run(module, cast):
            module.zero_grad(set_to_none=True)
            leaves = [x.detach().to(cast, copy=True).requires_grad_() for x in xs]
            outs = module(*leaves)
            outs = list(outs if isinstance(outs, (tuple, list)) else (outs,))[:self.outputs]
            ups = [torch.randn(o.shape, generator=torch.Generator().manual_seed(2 + i), dtype=torch.float64)
                   .to(device=device, dtype=cast) for i, o in enumerate(outs)]
            torch.autograd.backward(outs, ups)
            named = [(f"out{i}", "forward", o.detach()) for i, o in enumerate(outs)]
            named += [(f"d_input{i}", "backward", x.grad) for i, x in enumerate(leaves)]
            named += [(f"d_{n}", "backward", p.grad) for n, p in sorted(module.named_parameters())]
            return named

        r64, re, rf = run(ref64, torch.float64), run(eager, dtype), run(fused, dtype)
        checks = []
        if [n for n, _, _ in rf] != [n for n, _, _ in r64]:
            raise RuntimeError(f"fused and reference differ in outputs/parameters: {[n for n, _, _ in rf]} vs "
                               f"{[n for n, _, _ in r64]}")
        ref_named = {n: t for n, _, t in r64}
        for (name, kernel, o), (_, _, r), (_, _, e) in zip(rf, r64, re, strict=True):
            kwargs = {}
            if name in self.special:  # compared at the scale of what it sums, not at its own value
                factor, scale = self.special[name](ref_named, xs, ref64)
                kwargs = dict(factor=factor, atol=BASE_ATOL[dtype] * max(1.0, r.abs().max().item(), scale))
            ok, msg = three_way_check(o, r, e, name=name, **kwargs)
            checks.append({"name": name, "kernel": kernel, "max_err": max_abs_err(o, r),
                           "eager_max_err": max_abs_err(e, r), "pass": bool(ok), "message": msg})
        return checks


def _grid(C, Cg, A, up, normalize):
    def make():
        from attnfast.nn.grid_attention import GridAttention
        from attnfast.reference.grid_attention import GridAttention as Ref

        ref = Ref(C, Cg, A, up, normalize_attn=normalize)
        fused = GridAttention(C, Cg, A, up, normalize_attn=normalize)
        fused.load_state_dict(ref.state_dict())
        return ref, fused

    return make


def _sagan(C):
    def make():
        import torch

        from attnfast.nn.self_attention import SelfAttention2d
        from attnfast.reference.self_attention import SelfAttention

        fused = SelfAttention2d(C)
        with torch.no_grad():
            fused.gamma.fill_(0.7)
        ref = SelfAttention(C)
        ref.load_state_dict(fused.state_dict())
        return ref, fused

    return make


def _gate_module():
    def make():
        import torch.nn as nn

        from attnfast.ops import residual_gate
        from attnfast.reference import residual_gate_reference

        class Gate(nn.Module):
            def __init__(self, fn):
                super().__init__()
                self.fn = fn

            def forward(self, m, t):
                return self.fn(3 * m, t)  # mask logits of a few units: the sigmoid's whole range

        return Gate(residual_gate_reference), Gate(residual_gate)

    return make


def _cbam(C):
    def make():
        from attnfast.nn.cbam import CBAM
        from attnfast.reference.cbam import CBAM as Ref

        ref = Ref(C)
        fused = CBAM(C)
        fused.load_state_dict(ref.state_dict())
        return ref, fused

    return make


def _key_bias_scale(ref, xs, module):
    """The key bias adds q_i^T b to a whole softmax row: its exact gradient is 0 and the computed one is
    rounding noise from a sum of dK over N positions; factor 4 at the key weight gradient's scale."""
    return 4.0, ref["d_key_conv.weight"].abs().max().item()


def _gamma_scale(ref, xs, module):
    """``d_gamma = sum(up * T)`` with ``out = gamma * T + x``: a cancelling sum of B*C*N terms; its rounding
    grows like the root-sum-square of the terms (the upstream gradient is the one ``check`` draws)."""
    import torch

    up = torch.randn(ref["out0"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    terms = up.to(xs[0].device) * (ref["out0"] - xs[0]) / module.gamma.detach()
    return 2.0, terms.square().sum().sqrt().item()


_SAGAN_SPECIAL = {"d_key_conv.bias": _key_bias_scale, "d_gamma": _gamma_scale}


def real_cases() -> list:
    """The models' shapes (attnfast/models): AttnVGG's attention blocks (A = 256) at 224 and 512, the seed's
    SAGAN layer at C = 128 (64x64) and C = 512 (value channels split over the grid), RAN-56's stage-1
    gate, CBAM on a ResNet-50 stage-1 map. (Every SAGAN variant at every real shape: tests/gpu.)"""
    return [
        Case("grid_attention", "AttnVGG pool-3@224 softmax", "l=(8,256,28,28) g=(8,512,7,7) A=256 up=4",
             _grid(256, 512, 256, 4, True), [(8, 256, 28, 28), (8, 512, 7, 7)], outputs=2),
        Case("grid_attention", "AttnVGG pool-4@512 sigmoid", "l=(2,512,32,32) g=(2,512,16,16) A=256 up=2",
             _grid(512, 512, 256, 2, False), [(2, 512, 32, 32), (2, 512, 16, 16)], outputs=2),
        Case("self_attention", "SAGAN C=128 64x64", "x=(2,128,64,64)", _sagan(128), [(2, 128, 64, 64)],
             outputs=1, special=_SAGAN_SPECIAL),
        Case("self_attention", "SAGAN C=512 32x32", "x=(2,512,32,32)", _sagan(512), [(2, 512, 32, 32)],
             outputs=1, special=_SAGAN_SPECIAL),
        Case("residual_gate", "RAN-56 stage 1 @224", "m=t=(32,256,56,56)", _gate_module(),
             [(32, 256, 56, 56), (32, 256, 56, 56)]),
        Case("cbam", "ResNet-50 stage 1 @224", "x=(16,256,56,56)", _cbam(256), [(16, 256, 56, 56)],
             needs="attnfast.nn.cbam"),
    ]


def tiny_cases() -> list:
    return [
        Case("grid_attention", "tiny softmax", "l=(2,16,8,8) g=(2,32,4,4) A=16 up=2",
             _grid(16, 32, 16, 2, True), [(2, 16, 8, 8), (2, 32, 4, 4)], outputs=2),
        Case("grid_attention", "tiny sigmoid", "l=(2,8,6,6) g=(2,8,3,3) A=16 up=2",
             _grid(8, 8, 16, 2, False), [(2, 8, 6, 6), (2, 8, 3, 3)], outputs=2),
        Case("self_attention", "tiny", "x=(2,16,6,5)", _sagan(16), [(2, 16, 6, 5)], outputs=1, special=_SAGAN_SPECIAL),
        Case("self_attention", "tiny, 136 value channels", "x=(1,136,3,5)", _sagan(136), [(1, 136, 3, 5)],
             outputs=1, special=_SAGAN_SPECIAL),
        Case("residual_gate", "tiny", "m=t=(2,8,5,7)", _gate_module(), [(2, 8, 5, 7), (2, 8, 5, 7)]),
        Case("cbam", "tiny", "x=(2,32,6,6)", _cbam(32), [(2, 32, 6, 6)], needs="attnfast.nn.cbam"),
    ]


if __name__ == "__main__":
    sys.exit(main())
