"""The GPU runner, checked without a GPU: benchmarks/run_gpu.sh (arguments, the commands each part runs,
the install check), benchmarks/gpu_smoke.py end to end through the Triton interpreter at tiny shapes
(its JSON schema), and the per-test progress plugin benchmarks/gpu_progress.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_GPU = os.path.join(REPO, "benchmarks", "run_gpu.sh")
SMOKE = os.path.join(REPO, "benchmarks", "gpu_smoke.py")
PROGRESS = os.path.join(REPO, "benchmarks", "gpu_progress.py")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _sh(*args, env=None, cwd=REPO, timeout=300):
    full = dict(os.environ, PYTHON=sys.executable)
    full.update(env or {})
    return subprocess.run(["bash", RUN_GPU, *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------
# run_gpu.sh
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["bogus"], "unknown part or option 'bogus'"),
    (["--frobnicate", "smoke"], "unknown part or option '--frobnicate'"),
])
def test_run_gpu_rejects_bad_arguments(args, match):
    r = _sh(*args)
    assert r.returncode == 2 and match in r.stderr, (r.returncode, r.stderr)


@pytest.mark.parametrize("var, value", [("PART_TIMEOUT", "soon"), ("PART_TIMEOUT", "0"), ("TEST_WORKERS", "-1")])
def test_run_gpu_rejects_bad_environment(var, value):
    r = _sh("--dry-run", "smoke", env={var: value})
    assert r.returncode == 2 and var in r.stderr, r.stderr


def test_run_gpu_help_lists_every_part():
    r = _sh("--help")
    assert r.returncode == 0
    for part in ("smoke", "tests", "grid", "self", "gate", "cbam", "train", "all", "install", "RESULTS_DIR"):
        assert part in r.stdout, part


@pytest.mark.parametrize("parts", [["all"], []], ids=["all", "default"])
def test_run_gpu_dry_run_writes_every_part_under_results_dir(tmp_path, parts):
    out = tmp_path / "out"
    r = _sh("--dry-run", *parts, "--", "-k", "bfloat16", env={"RESULTS_DIR": str(out), "PART_TIMEOUT": "123"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    parts = [ln.split()[1] for ln in lines if ln.startswith("=== ")]
    assert parts == ["smoke", "tests", "grid", "self", "gate", "cbam", "train"]
    cmds = [ln for ln in lines if ln.startswith("+ ")]
    assert sum("pip install" in c and "--no-deps" in c and "--no-build-isolation" in c and "--no-index" in c
               and " -e " not in c for c in cmds) == 1, "one regular install, before the first part"
    assert any("import attnfast.kernels" in c for c in cmds)
    runs = [c for c in cmds if c.startswith("+ timeout --signal=INT --kill-after=30 123 ")]
    assert any("gpu_smoke.py --out-dir " + str(out) in c for c in runs)
    suites = {"test_bench_grid_attention.py": "grid_attention", "test_bench_self_attention.py": "self_attention",
              "test_bench_residual_gate.py": "residual_gate", "test_bench_train_step.py": "train_step"}
    for file, name in suites.items():
        c = next(c for c in runs if file in c)
        assert f"--benchmark-json {out}/{name}_DEVICE.json" in c and f"--progress-jsonl {out}/{name}_DEVICE.jsonl" in c
        assert c.endswith("-k bfloat16") and " -P -m pytest " in c
    tests = next(c for c in runs if "tests/gpu tests/ops tests/nn" in c)
    assert f"--junitxml {out}/tests_DEVICE.xml" in tests and tests.endswith("-k bfloat16")
    if os.path.exists(os.path.join(REPO, "benchmarks", "test_bench_cbam.py")):
        assert any("test_bench_cbam.py" in c for c in runs)
    else:
        assert "part 'cbam' skipped: benchmarks/test_bench_cbam.py does not exist" in r.stderr
    assert not any(out.iterdir()), "a dry run writes nothing"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_run_gpu_needs_cuda_for_a_gpu_part(tmp_path):
    r = _sh("smoke", env={"RESULTS_DIR": str(tmp_path)})
    assert r.returncode == 3 and "no CUDA device" in r.stderr, r.stderr
    assert "pip install" not in r.stdout, "nothing is installed before the device check"


def _kernels_in_checkout() -> bool:
    import attnfast.kernels

    return os.path.realpath(attnfast.kernels.__file__).startswith(os.path.realpath(REPO) + os.sep)


def test_run_gpu_install_check_refuses_the_checkout(tmp_path):
    """With the editable install of a development checkout, attnfast.kernels resolves into the checkout:
    the check refuses it (the GPU runner wants the regular install in site-packages)."""
    if not _kernels_in_checkout():
        pytest.skip("attnfast is installed regularly here: the check would accept it")
    r = _sh("install", env={"SKIP_INSTALL": "1", "RESULTS_DIR": str(tmp_path)}, cwd=str(tmp_path))
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "not into site-packages" in r.stderr


def test_run_gpu_install_is_regular_and_checked(tmp_path):
    """``run_gpu.sh install`` into a fresh virtualenv (torch from this environment): the kernels mapping
    survives (attnfast.kernels imports from the new site-packages)."""
    if not _kernels_in_checkout():
        pytest.skip("attnfast is installed regularly here; this environment's site-packages would shadow it")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # torch, setuptools and wheel from this environment (pip never uninstalls outside its own prefix)
    site = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "torch")))
    if subprocess.run([py, "-c", "import setuptools, wheel, torch"], env=dict(os.environ, PYTHONPATH=site),
                      capture_output=True).returncode:
        pytest.skip("no setuptools/wheel/torch to build and import with offline")
    r = _sh("install", env={"PYTHON": py, "PYTHONPATH": site, "RESULTS_DIR": str(tmp_path / "res")},
            timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"attnfast.kernels from {os.path.realpath(env_dir)}" in r.stdout


# ----------------------------------------------------------------------------------------------
# gpu_smoke.py
# ----------------------------------------------------------------------------------------------
def _smoke(*args, timeout=600):
    env = dict(os.environ)
    env.pop("ATTNFAST_BACKEND", None)
    return subprocess.run([sys.executable, SMOKE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _only_json(folder):
    files = [f for f in os.listdir(folder) if f.endswith(".json")]
    assert len(files) == 1 and not [f for f in os.listdir(folder) if f.endswith(".tmp")], os.listdir(folder)
    with open(os.path.join(folder, files[0])) as f:
        return files[0], json.load(f)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU one")
def test_smoke_tiny_runs_every_kernel_through_the_interpreter(tmp_path):
    r = _smoke("--tiny", "--dtypes", "fp32", "--out-dir", str(tmp_path))
    name, doc = _only_json(tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:], json.dumps(doc)[-3000:])
    assert name.startswith("gpu_smoke_CPU") and name.endswith("_tiny.json")
    for key in ("schema", "device", "torch", "triton", "python", "date", "started_utc", "finished_utc",
                "complete", "pass", "settings", "results"):
        assert key in doc, key
    assert doc["schema"] == "attnfast.gpu_smoke/1" and doc["torch"] == torch.__version__
    assert doc["pass"] is True and doc["complete"] is True and doc["finished_utc"]
    assert doc["settings"]["mode"] == "tiny" and doc["settings"]["backend"] == "triton (interpreter)"
    ran = [e for e in doc["results"] if not e.get("skipped")]
    assert {e["op"] for e in ran} >= {"grid_attention", "self_attention", "residual_gate"}
    for e in ran:
        assert e["pass"] is True and e["dtype"] == "torch.float32" and e["seconds"] >= 0
        assert set(e["kernels"]) == {"forward", "backward"}
        for k in e["kernels"].values():
            assert isinstance(k["max_err"], float) and isinstance(k["eager_max_err"], float) and k["pass"] is True
        assert all({"name", "kernel", "max_err", "eager_max_err", "pass", "message"} <= set(c) for c in e["checks"])
    grid = next(e for e in ran if e["op"] == "grid_attention")
    names = {c["name"] for c in grid["checks"]}
    assert {"out0", "out1", "d_input0", "d_input1", "d_W_l.weight", "d_phi.bias"} <= names
    cbam = [e for e in doc["results"] if e["op"] == "cbam"]
    assert cbam and all(e.get("skipped") or e["pass"] for e in cbam)


def test_smoke_budget_records_what_it_skipped(tmp_path):
    r = _smoke("--tiny", "--dtypes", "fp32", "--budget-s", "1e-9", "--out-dir", str(tmp_path))
    _, doc = _only_json(tmp_path)
    assert r.returncode == 1, "nothing verified is not a pass"
    assert doc["results"] and all("time budget" in e["skipped"] for e in doc["results"])
    assert doc["complete"] is False and doc["pass"] is False


@pytest.mark.parametrize("args, match", [
    (["--dtypes", "fp8"], "--dtypes must be"),
    (["--budget-s", "0"], "--budget-s must be positive"),
    pytest.param([], "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only")),
    pytest.param(["--tiny", "--dtypes", "bf16"], "bf16 needs a GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only")),
])
def test_smoke_bad_arguments(tmp_path, args, match):
    r = _smoke(*args, "--out-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2 and match in r.stderr, r.stderr
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------
# gpu_progress.py
# ----------------------------------------------------------------------------------------------
def test_progress_plugin_writes_each_benchmark_as_it_finishes(tmp_path):
    suite = tmp_path / "test_tiny_bench.py"
    suite.write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_sum(benchmark, n):\n"
        "    benchmark.extra_info.update(provider='fused', mode='fwd', op='sum', shape=str(n), dtype='int')\n"
        "    benchmark.pedantic(sum, args=(range(n),), rounds=2, iterations=1)\n\n"
        "def test_skipped():\n"
        "    pytest.skip('not here')\n")
    jsonl = tmp_path / "p.jsonl"
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "benchmarks"))
    r = subprocess.run([sys.executable, "-P", "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
                        "-p", "gpu_progress", "--progress-jsonl", str(jsonl), "--rootdir", str(tmp_path)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(ln) for ln in jsonl.read_text().splitlines()]
    assert [x["outcome"] for x in recs] == ["passed", "passed", "skipped"]
    assert recs[2]["reason"].endswith("not here")
    bench = recs[0]["benchmark"]
    assert bench["extra_info"]["provider"] == "fused" and bench["stats"]["rounds"] == 2 and "data" not in bench["stats"]
    with open(jsonl, "a") as f:
        f.write('{"nodeid": "cut by a ki')  # the last line of a killed run
    out = tmp_path / "partial.json"
    r = subprocess.run([sys.executable, PROGRESS, str(jsonl), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and len(doc["benchmarks"]) == 2
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import report

        _, rows = report.load(str(out))
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    assert [row["shape"] for row in rows] == ["1", "2"] and all(row["median"] >= 0 for row in rows)
