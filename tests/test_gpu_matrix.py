"""What a GPU run collects, checked without a GPU, so that a collection bug cannot hide a GPU case.

Collection runs in a subprocess twice over tests/ops, tests/nn and tests/gpu: as here (CPU,
interpreter) and with ``ATTNFAST_TEST_FAKE_CUDA=1``, which makes the conftest decide exactly as on
a CUDA machine (``--collect-only``: nothing runs). Checked:

- every test of the op matrices (grid attention, self-attention, residual gate; tests/gpu) that runs
  here still runs on a GPU machine (on CUDA, through the ``device`` fixture), others that would not are
  named in a warning, and a GPU machine adds exactly the gpu-marked tests;
- the real-shape matrix (tests/gpu/test_real_shapes.py) is collected for every op and precision,
  and its tables are the shapes the models really run (traced on the meta device);
- bf16 runs on a GPU machine for every op and never here (the interpreter's bf16 is wrong).
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["tests/ops", "tests/nn", "tests/gpu"]
OP_FILES = {  # op -> its CPU-matrix test files
    "grid_attention": ["tests/ops/test_grid_attention.py", "tests/nn/test_grid_attention_module.py"],
    "self_attention": ["tests/ops/test_self_attention.py", "tests/nn/test_self_attention_module.py"],
    "residual_gate": ["tests/ops/test_residual_gate.py"],
    "cbam": ["tests/ops/test_cbam.py"],
    "attention_pool": ["tests/ops/test_attention_pool.py", "tests/nn/test_attention_pool_module.py"],
    "attention_gate": ["tests/ops/test_attention_gate.py"],
}
# The op matrices must lose nothing on a GPU machine. Elsewhere in tests/ops and tests/nn, a test that feeds
# CPU tensors to the forced Triton backend runs only in the interpreter: skipped on a GPU machine, and
# listed here in a warning (taking the ``device`` fixture moves it to CUDA).
STRICT = [f for files in OP_FILES.values() for f in files] + ["tests/gpu/test_real_shapes.py"]

_COLLECT = r"""
import json, sys
import pytest

class Record:
    items = []

    def pytest_collection_finish(self, session):
        for it in session.items:
            self.items.append({"id": it.nodeid, "gpu": it.get_closest_marker("gpu") is not None,
                               "skipped": any(True for _ in it.iter_markers("skip"))})

rec = Record()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[rec])
print("@@COLLECTED " + json.dumps({"code": int(code), "items": rec.items}))
"""


@functools.lru_cache(maxsize=None)
def collected(fake_cuda: bool) -> dict:
    """nodeid -> {"gpu": marked gpu, "skipped": skip-marked at collection}."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the conftest decides, as in a fresh process
    env.pop("ATTNFAST_TEST_FAKE_CUDA", None)
    if fake_cuda:
        env["ATTNFAST_TEST_FAKE_CUDA"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-P", "-c", _COLLECT, *PATHS], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("@@COLLECTED ")), None)
    assert line is not None, f"collection printed no result:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads(line[len("@@COLLECTED "):])
    assert res["code"] == 0, f"collection failed (exit {res['code']}):\n{r.stdout[-3000:]}"
    return {it["id"]: it for it in res["items"]}


def runs(items: dict) -> set:
    return {k for k, v in items.items() if not v["skipped"]}


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


DTYPE_TAGS = {"float32": ("torch.float32", "::test_fp32_"), "float16": ("torch.float16",),
              "bfloat16": ("torch.bfloat16",)}


def _has_dtype(nodeid: str, dtype: str) -> bool:
    return any(tag in nodeid for tag in DTYPE_TAGS[dtype])


def _real_shapes_module():
    spec = importlib.util.spec_from_file_location("_attnfast_real_shapes",
                                                  os.path.join(ROOT, "tests/gpu/test_real_shapes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_run_keeps_every_cpu_case_and_adds_the_gpu_ones():
    cpu, gpu = collected(False), collected(True)
    strict_ids = {k for k in cpu if _file(k) in STRICT}
    assert strict_ids == {k for k in gpu if _file(k) in STRICT}, "the op matrices must collect the same tests anywhere"
    lost = runs(cpu) - runs(gpu)
    strict = sorted(k for k in lost if _file(k) in STRICT)
    assert not strict, f"op-matrix tests that run here but not on a GPU machine (take the device fixture): {strict}"
    if lost:
        warnings.warn(f"{len(lost)} interpreter-only tests (CPU tensors with the forced Triton backend) are "
                      f"skipped on a GPU machine: {sorted(lost)}")
    gained = runs(gpu) - runs(cpu)
    assert gained == {k for k, v in gpu.items() if v["gpu"]}, "a GPU machine must add exactly the gpu-marked tests"
    assert not any(v["gpu"] for k, v in cpu.items() if k in runs(cpu)), "gpu-marked tests must be skipped here"


def test_op_matrices_run_on_cuda_in_every_dtype():
    gpu = runs(collected(True))
    cpu = runs(collected(False))
    for op, files in OP_FILES.items():
        for f in files:
            forced = [k for k in gpu if _file(k) == f and "triton_backend" in k]
            assert forced, f"{f}: no Triton-backend case runs on a GPU machine"
        ids = [k for k in gpu if _file(k) in files]
        for dtype in ("float32", "float16", "bfloat16"):
            assert any(_has_dtype(k, dtype) for k in ids), f"{op}: no {dtype} case on a GPU machine"
        assert not any(_has_dtype(k, "bfloat16") for k in cpu if _file(k) in files), f"{op}: bf16 here"


def test_real_shape_matrix_is_collected_per_op_and_precision():
    mod = _real_shapes_module()
    assert set(mod.OPS) >= {"grid_attention", "self_attention", "residual_gate"}
    expected = collections.Counter()
    for op, (cases, _, precisions, _) in mod.OPS.items():
        assert {"fp32", "fp16", "bf16"} <= set(precisions), f"{op}: precisions {precisions}"
        assert len(cases) >= 3, f"{op}: too few real shapes"
        for p in precisions:
            expected[(op, p)] = len(cases)
    assert set(mod.TINY) == set(mod.OPS), "every op needs tiny cases (test_checks_at_tiny_shapes)"
    got = collections.Counter()
    gpu = collected(True)
    real = [k for k in gpu if k.startswith("tests/gpu/test_real_shapes.py::test_real_shape[")]
    for k, v in gpu.items():
        if k in real:
            assert v["gpu"] and not v["skipped"], k
            param = k.split("[", 1)[1].rstrip("]")
            got[(param.split("-", 1)[0], param.rsplit("-", 1)[1])] += 1
    assert got == expected
    cpu = collected(False)
    assert all(cpu[k]["skipped"] for k in real)


def test_real_shapes_are_the_models_shapes():
    """AttnVGG's attention blocks at 224 and 512 and RAN-56's gates at 224, traced on the meta device."""
    from attnfast.models.attnvgg import AttnVGG
    from attnfast.models.ran import ran56
    from attnfast.reference.grid_attention import GridAttention
    from attnfast.reference.residual_attention import ResidualAttentionModule

    mod = _real_shapes_module()
    grid, gates = [], []

    def grid_forward(self, l, g):  # record, and return outputs of the right shapes (meta tensors)
        grid.append((l.shape[1], g.shape[1], self.attn_features, l.shape[2], self.up_factor, g.shape[2]))
        return l[:, :1], l.sum((2, 3))

    def gate(self, mask, trunk):
        gates.append(tuple(trunk.shape[1:]))
        return trunk

    with pytest.MonkeyPatch.context() as mp, torch.device("meta"):
        mp.setattr(GridAttention, "forward", grid_forward)
        mp.setattr(ResidualAttentionModule, "gate", gate)
        vgg = AttnVGG(2, attention="reference")
        for size in (224, 512):
            vgg(torch.empty(1, 3, size, size))
        ran56(2, attention="reference")(torch.empty(1, 3, 224, 224))
    table = [(c, cg, a, h, up, h // up) for _, _, c, cg, a, h, up in mod.GRID_REAL]
    assert sorted(table) == sorted(grid)
    assert sorted({tuple(shape[1:]) for _, shape, _ in mod.GATE_REAL}) == sorted(set(gates))
    sagan = mod.SAGAN_REAL
    assert {c for _, c, _, _, _ in sagan} == {64, 128, 256, 512}
    assert max(h * w for _, _, h, w, _ in sagan) == 128 * 128
    for option in ("pool", "heads", "value_dim"):
        assert any(option in o for *_, o in sagan), option
    assert any(not o for *_, o in sagan), "the seed's layer itself"
