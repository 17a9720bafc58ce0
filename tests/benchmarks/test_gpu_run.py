"""The GPU runs, rehearsed without a GPU so they cannot rot: benchmarks/gpu_run.sh and gpu_bench.py on the fake
CPU device (both plans end to end: at most 7 files, names the device tool brings back, outputs that parse, the
time box), the time-box estimates in gpu_run.sh's header, the wheel build and install check (gpu_wheel.py),
gpu_smoke.py through the Triton interpreter, and the per-test progress plugin (gpu_progress.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
GPU_RUN = os.path.join(BENCH, "gpu_run.sh")
SMOKE = os.path.join(BENCH, "gpu_smoke.py")
sys.path.insert(0, BENCH)

import gpu_bench  # noqa: E402
import gpu_wheel  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the fake device is the CPU rehearsal")
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back
MAX_FILES = 7


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("ATTNFAST_BACKEND", None)
    env.update(extra)
    return env


def _sh(*args, timeout=300, **env):
    return subprocess.run(["bash", GPU_RUN, *args], cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _outputs(folder) -> dict:
    files = {}
    for root, dirs, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            rel = os.path.relpath(path, folder)
            assert rel.count(os.sep) <= 2 and all(DEVICE_NAME.match(part) for part in rel.split(os.sep)), rel
            assert os.path.getsize(path) <= 16 * 2 ** 20, rel
            files[rel] = path
    assert len(files) <= MAX_FILES, sorted(files)
    assert not [f for f in files if f.endswith(".tmp")], sorted(files)
    return files


# ----------------------------------------------------------------------------------------------
# the time box, by the estimates
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", list(gpu_bench.PLANS))
def test_each_plan_fits_its_time_box_by_its_estimate(plan):
    e = gpu_bench.estimate(gpu_bench.PLANS[plan])
    assert e["total_s"] <= gpu_bench.TIME_BOX_S == 480, e
    assert e["total_s"] <= e["deadline_s"] + e["startup_s"], e
    assert len(e["per_case"]) == len(gpu_bench.PLANS[plan].cases) and all(c["time_s"] > 0 for c in e["per_case"])
    # every case's worker can compile its share inside the prepare phase, or it is counted into timing
    assert e["prepare_overflow_s"] == 0 or e["timing_s"] >= e["prepare_overflow_s"]


def test_gpu_run_header_states_the_current_estimates():
    header = [ln[2:] for ln in open(GPU_RUN).read().splitlines() if re.match(r"# (headline|rest): ", ln)]
    want = [line for p in gpu_bench.PLANS.values() for line in gpu_bench.estimate_lines(p)]
    assert header == want, "rerun `python benchmarks/gpu_bench.py estimate` and paste its lines into gpu_run.sh"


def test_headline_plan_measures_every_goal_against_the_named_baselines():
    cases = gpu_bench.HEADLINE.cases
    goals = {c.goal for c in cases} | {"sagan_train"}
    assert goals - {None} == set(gpu_bench.GOALS)
    sagan = [c for c in cases if c.op == "sagan"]
    assert {c.p["H"] * c.p["W"] for c in sagan} == {4096, 16384, 65536}
    for c in sagan:
        assert {"eager", "sdpa_default", "sdpa_mem_efficient", "sdpa_flash_padded", "flex", "compile"} <= set(c.providers)
    assert any(c.p == {"B": 8, "C": 128, "H": 256, "W": 256} for c in sagan)  # the training goal's shape
    for op in ("grid", "cbam", "gate"):
        assert all({"eager", "compile", "fused"} == set(c.providers) for c in cases if c.op == op)
    assert {c.dtype for c in cases if c.op == "grid"} == {"bf16", "fp32"}
    train = [c for c in cases if c.op == "train"]
    assert len(train) == 1 and train[0].p["size"] == 512 and train[0].p["cap"] > 0 and cases[-1] is train[0]
    assert [k for k, _ in gpu_bench.HEADLINE.correctness] == ["smoke", "tests"]


# ----------------------------------------------------------------------------------------------
# both plans on the fake device
# ----------------------------------------------------------------------------------------------
def _check_result(plan, folder):
    files = _outputs(folder)
    expected = {f"{plan}.json", f"{plan}.md", f"{plan}_run.log", f"{plan}_tests.log", f"{plan}_tests.jsonl"}
    if plan == "headline":
        expected.add(f"{plan}_smoke.json")
    assert set(files) == expected
    with open(files[f"{plan}.json"]) as f:
        doc = json.load(f)
    assert doc["schema"] == gpu_bench.SCHEMA and doc["plan"] == plan and doc["dry_run"] is True
    assert doc["install"]["ok"] and doc["install"]["vs_checkout"]["same"]
    assert doc["complete"] is True and doc["finished_utc"], doc.get("interrupted")
    for kind, c in doc["correctness"].items():
        assert c["status"] == "passed", (kind, c)
    assert doc["correctness"]["tests"]["counts"].get("passed", 0) >= 1
    cases = doc["cases"]
    assert [c["id"] for c in cases] == [c.id for c in gpu_bench.run_cases(gpu_bench.PLANS[plan], True)]
    compiled = 0
    for c in cases:
        assert c["status"] == "ok", c
        assert set(c["providers"]) == set(c["providers_planned"])
        for name, p in c["providers"].items():
            if name == "flex":  # tried: FlexAttention has no backward on a CPU
                assert p["status"] == "error" and "backward on CPU" in p["warmup_error"]
                continue
            if name == "sdpa_mem_efficient":  # tried: no such kernel on a CPU, and SDPA raises, never falls back
                assert p["status"] == "error" and "backend" in p["warmup_error"]
                continue
            assert p["status"] == "ok" and p["times"]["n"] >= 2 and p["times"]["median_s"] > 0, (c["id"], name, p)
            if name == "compile":
                compiled += 1
                v = p["compile"]
                assert v["valid"] and v["graphs"] >= 1 and v["graph_calls"] >= v["calls"] == p["times"]["n"], v
            if name in ("sdpa_default", "sdpa_flash_padded"):
                want = {"sdpa_default": "MATH", "sdpa_flash_padded": "FLASH_ATTENTION"}[name]
                assert p["backend"]["sdpa_choice"] == want and p["backend"]["profiled"]["backends"] == [want]
            if c["op"] != "train" and name not in ("eager", "fused"):
                assert p["agreement"]["rel_l2"] < 1e-4, (c["id"], name, p["agreement"])
        if c["op"] == "train":
            for p in c["providers"].values():
                assert p["max_batch"]["capped"] and p["max_batch"]["max_batch"] == 4
    assert compiled >= 3
    assert {g["id"] for g in doc["goals"]} == set(gpu_bench.GOALS)
    md = open(files[f"{plan}.md"]).read()
    assert "DRY RUN" in md and "## Goals" in md and all(g in md for g in gpu_bench.GOALS.values())
    for line in open(files[f"{plan}_tests.jsonl"]):
        assert json.loads(line)["outcome"] == "passed"
    if plan == "headline":
        with open(files["headline_smoke.json"]) as f:
            smoke = json.load(f)
        assert smoke["pass"] is True and smoke["settings"]["ops"] == ["residual_gate"]
    assert "wrote" in open(files[f"{plan}_run.log"]).read()
    return doc


@needs_bash
@cpu_only
@pytest.mark.parametrize("plan", list(gpu_bench.PLANS))
def test_dry_run_of_each_command(tmp_path, plan):
    r = _sh("--dry-run", plan, OUT=str(tmp_path / "out"), timeout=600)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    doc = _check_result(plan, tmp_path / "out")
    assert doc["settings"]["deadline_s"] <= 470 - 15


@cpu_only
def test_dry_run_past_its_time_box_keeps_a_valid_record(tmp_path):
    """A deadline that ends the run at once: every case is recorded as skipped for time, correctness as cut
    short, the files still parse (gpu_bench.py directly, no shell)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-P", os.path.join(BENCH, "gpu_bench.py"), "run", "headline", "--out",
                        str(out), "--dry-run", "--deadline-s", "10.5"], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    files = _outputs(out)
    with open(files["headline.json"]) as f:
        doc = json.load(f)
    assert r.returncode == 1, (r.stdout[-3000:], r.stderr[-3000:])  # correctness did not pass: not a success
    assert doc["complete"] is False
    assert all(c["status"] == "skipped" and "time" in c["reason"] for c in doc["cases"]), doc["cases"]
    assert all(c.get("cut_short") or c["status"] == "passed" for c in doc["correctness"].values())
    assert all(g["status"] == "not measured" for g in doc["goals"])
    assert "Not measured" in open(files["headline.md"]).read()


@needs_bash
@pytest.mark.parametrize("args, match", [
    (["bogus"], "unknown plan or option 'bogus'"),
    (["headline", "rest"], "one plan per command"),
    ([], "name a plan"),
])
def test_gpu_run_rejects_bad_arguments(args, match):
    r = _sh(*args)
    assert r.returncode == 2 and match in r.stderr, r.stderr


@needs_bash
def test_gpu_run_rejects_a_bad_time_box(tmp_path):
    r = _sh("--dry-run", "headline", GPU_RUN_TOTAL_S="soon", OUT=str(tmp_path))
    assert r.returncode == 2 and "GPU_RUN_TOTAL_S" in r.stderr
    assert not os.listdir(tmp_path)


@needs_bash
def test_gpu_run_without_a_wheel_says_how_to_build_one(tmp_path):
    r = _sh("headline", OUT=str(tmp_path / "out"), GPU_WHEEL_DIR=str(tmp_path / "none"))
    assert r.returncode == 2 and "gpu_wheel.py build" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------
# the wheel and the install check
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    for mod in ("setuptools", "wheel"):
        pytest.importorskip(mod)
    out = tmp_path_factory.mktemp("wheel")
    manifest = gpu_wheel.build(str(out))
    return out, manifest


def test_wheel_holds_the_checkout_package_and_no_top_level_kernels(wheel_dir):
    out, manifest = wheel_dir
    whl = out / manifest["wheel"]
    assert sorted(os.listdir(out)) == sorted([manifest["wheel"], gpu_wheel.MANIFEST])
    assert manifest["wheel"].endswith("-py3-none-any.whl")
    names = gpu_wheel.wheel_files(str(whl))
    kernels = sorted(f for f in os.listdir(os.path.join(REPO, "kernels")) if f.endswith(".py"))
    assert kernels and all(f"attnfast/kernels/{k}" in names for k in kernels)
    assert not any(n.startswith("kernels/") for n in names)
    assert manifest["files"] == gpu_wheel.checkout_files() and gpu_wheel.check_wheel(str(whl))["problems"] == []
    assert manifest["wheel_sha256"] == gpu_wheel.sha256_file(str(whl))


def _install(whl, site):
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                        "--target", str(site), str(whl)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def _verify(site, manifest, cwd):
    env = _env(PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-P", os.path.join(BENCH, "gpu_wheel.py"), "verify", "--manifest",
                           str(manifest)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_wheel_is_verified_and_a_changed_file_is_named(wheel_dir, tmp_path):
    out, manifest = wheel_dir
    site = tmp_path / "site"
    _install(out / manifest["wheel"], site)
    r = _verify(site, out / gpu_wheel.MANIFEST, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["ok"] and res["location"] == os.path.realpath(site / "attnfast") and not res["from_checkout"]
    assert res["wheel"]["commit"] == manifest["commit"]
    # the code that would run is not this checkout's: refused, and the file named
    with open(site / "attnfast" / "kernels" / "aot" / "registry.py", "a") as f:
        f.write("\n# changed\n")
    r = _verify(site, out / gpu_wheel.MANIFEST, tmp_path)
    assert r.returncode == 1 and "attnfast/kernels/aot/registry.py" in r.stderr, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["vs_checkout"]["changed"] == ["attnfast/kernels/aot/registry.py"] == res["vs_wheel"]["changed"]


def test_verify_refuses_the_checkout_itself(tmp_path):
    """The editable development install imports the checkout: fine for the dry run, refused for a GPU run."""
    import attnfast

    if not os.path.realpath(attnfast.__file__).startswith(os.path.realpath(REPO) + os.sep):
        pytest.skip("attnfast is installed regularly here")
    r = subprocess.run([sys.executable, "-P", os.path.join(BENCH, "gpu_wheel.py"), "verify"], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "imported from the checkout" in r.stderr


@needs_bash
@cpu_only
def test_gpu_run_installs_the_wheel_then_needs_a_gpu(wheel_dir, tmp_path):
    """The real command here: the wheel installs into a fresh target, the check accepts it, and with no
    CUDA device nothing is measured (exit 3), which the result file says."""
    out, _ = wheel_dir
    r = _sh("headline", OUT=str(tmp_path / "res"), GPU_WHEEL_DIR=str(out))
    assert r.returncode == 3, (r.stdout[-3000:], r.stderr[-3000:])
    assert "pip install --no-deps --no-index" in r.stdout
    with open(tmp_path / "res" / "headline.json") as f:
        doc = json.load(f)
    assert doc["install"]["ok"] and "attnfast-site" in doc["install"]["location"] and "no CUDA" in doc["error"]


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


@cpu_only
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
    out = tmp_path / "s.json"
    r = _smoke("--tiny", "--dtypes", "fp32", "--budget-s", "1e-9", "--out", str(out), "--ops",
               "grid_attention,residual_gate")
    _, doc = _only_json(tmp_path)
    assert r.returncode == 1, "nothing verified is not a pass"
    assert [e["op"] for e in doc["results"]] == ["grid_attention", "grid_attention", "residual_gate"]
    assert doc["results"] and all("time budget" in e["skipped"] for e in doc["results"])
    assert doc["complete"] is False and doc["pass"] is False


@pytest.mark.parametrize("args, match", [
    (["--dtypes", "fp8"], "--dtypes must be"),
    (["--ops", "grid"], "--ops must be"),
    (["--budget-s", "0"], "--budget-s must be positive"),
    pytest.param([], "no CUDA device", marks=cpu_only),
    pytest.param(["--tiny", "--dtypes", "bf16"], "bf16 needs a GPU", marks=cpu_only),
])
def test_smoke_bad_arguments(tmp_path, args, match):
    r = _smoke(*args, "--out-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2 and match in r.stderr, r.stderr
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------
# gpu_progress.py
# ----------------------------------------------------------------------------------------------
def test_progress_plugin_writes_each_test_as_it_finishes(tmp_path):
    suite = tmp_path / "test_tiny.py"
    suite.write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_sum(benchmark, n):\n"
        "    benchmark.extra_info.update(provider='fused', mode='fwd', op='sum', shape=str(n), dtype='int')\n"
        "    benchmark.pedantic(sum, args=(range(n),), rounds=2, iterations=1)\n\n"
        "def test_fails():\n"
        "    assert 1 == 2, 'broken'\n\n"
        "def test_skipped():\n"
        "    pytest.skip('not here')\n")
    jsonl = tmp_path / "p.jsonl"
    env = dict(os.environ, PYTHONPATH=BENCH)
    r = subprocess.run([sys.executable, "-P", "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
                        "-p", "gpu_progress", "--progress-jsonl", str(jsonl), "--rootdir", str(tmp_path)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(ln) for ln in jsonl.read_text().splitlines()]
    assert [x["outcome"] for x in recs] == ["passed", "passed", "failed", "skipped"]
    assert "broken" in recs[2]["error"] and recs[3]["reason"].endswith("not here")
    bench = recs[0]["benchmark"]
    assert bench["extra_info"]["provider"] == "fused" and bench["stats"]["rounds"] == 2 and "data" not in bench["stats"]


# ----------------------------------------------------------------------------------------------
# goals, from the numbers alone
# ----------------------------------------------------------------------------------------------
def _prov(ms, status="ok", **extra):
    return {"status": status, "times": {"median_s": ms / 1e3, "p20_s": ms / 1e3, "p80_s": ms / 1e3, "n": 5}, **extra}


def _case(cid, goal, op="grid", **provs):
    return {"id": cid, "goal": goal, "op": op, "mode": "fwd+bwd", "status": "ok", "providers": provs}


def test_goals_met_missed_and_not_measured():
    doc = {"cases": [
        _case("g1", "grid", eager=_prov(10), compile=_prov(5), fused=_prov(2)),  # 5x, 2.5x: met
        _case("g2", "grid", eager=_prov(10), compile=_prov(3), fused=_prov(2)),  # 1.5x compile: missed
        _case("c1", "cbam", eager=_prov(10), compile=_prov(10, status="invalid"), fused=_prov(1)),  # no compile
        _case("s1", "self", op="sagan", fused=_prov(10), sdpa_default=_prov(14), flex=_prov(12.5),
              sdpa_mem_efficient={"status": "error"}),  # best peer flex: 1.25x: met
        {"id": "s3", "goal": "self", "op": "sagan", "mode": "fwd+bwd", "status": "ok",
         "info": {"params": {"B": 8, "C": 128, "H": 256, "W": 256}},
         "providers": {"fused": _prov(300, peak_mem_bytes=20 * 2 ** 30), "flex": _prov(330),
                       "eager": {"status": "oom"}}},  # 1.1x: missed; but the training shape ran
        _case("t1", "attnvgg512", op="train",
              reference=_prov(300, max_batch={"max_batch": 40, "first_failing": 41}),
              fused=_prov(150, max_batch={"max_batch": 1024, "first_failing": None, "capped": True})),
    ]}
    goals = {g["id"]: g for g in gpu_bench.evaluate_goals(doc)}
    assert goals["grid"]["status"] == "missed" and [r["met"] for r in goals["grid"]["cases"]] == [True, False]
    assert goals["cbam"]["status"] == "not measured"  # an invalid compile is no number
    assert goals["self"]["status"] == "missed" and goals["self"]["cases"][0]["best_peer"] == "flex"
    assert goals["self"]["cases"][0]["met"] and abs(goals["self"]["cases"][0]["vs_best"] - 1.25) < 1e-9
    assert goals["sagan_train"]["status"] == "met" and "20.0 GiB" in goals["sagan_train"]["cases"][0]["text"]
    t = goals["attnvgg512"]["cases"][0]
    assert goals["attnvgg512"]["status"] == "met" and t["batch_ratio_is_lower_bound"] and t["step_speedup"] == 2
    md = gpu_bench.render_markdown({"plan": "headline", "cases": doc["cases"], "goals": list(goals.values())})
    assert "**missed**" in md and "**not measured**" in md and ">= " in md
