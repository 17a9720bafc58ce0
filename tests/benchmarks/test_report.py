"""benchmarks/report.py: tables, speedups and the roofline share computed from a result file."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(REPO, "benchmarks", "report.py")


def _bench(provider, mode, median, device="NVIDIA H100 80GB HBM3", **extra):
    e = {"provider": provider, "mode": mode, "op": "grid_attention", "shape": "(8, 256, 28, 28)",
         "dtype": "torch.bfloat16", "device": device, "torch": "2.11.0", "triton": "3.6.0",
         "python": "3.12", "date": "2026-11-21", "peak_mem_bytes": 2 * 1024 * 1024, "saved_bytes": 1024 * 1024}
    e.update(extra)
    return {"name": f"t[{provider}-{mode}]", "extra_info": e, "stats": {"median": median}}


def test_report_markdown_speedups_and_roofline(tmp_path):
    data = {"datetime": "2026-11-21T00:00:00", "benchmarks": [
        _bench("eager", "fwd", 4e-3), _bench("compile", "fwd", 2e-3),
        _bench("fused", "fwd", 1e-3, bytes=2.345e9, flops=1e9)]}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(data))
    r = subprocess.run([sys.executable, REPORT, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "grid.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "2026-11-21" in md and "triton 3.6.0" in md
    assert "4.00×" in md and "2.00×" in md  # fused vs eager, fused vs compile
    # 2.345e9 B in 1 ms = 2.345 TB/s = 70% of 3.35 TB/s
    assert "| 70% |" in md and "memory |" in md
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_report_errors_cleanly_on_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run([sys.executable, REPORT, str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad.json" in r.stderr and "Traceback" not in r.stderr


def test_report_pairs_per_second_and_exp_share(tmp_path):
    # 8 * 4096^2 pairs in 0.1 ms = 1342 G pairs/s; fwd+bwd: 2 exps per pair -> 2.68e12 exp/s / 3.9e12 = 69%
    pairs = 8 * 4096 * 4096
    data = {"benchmarks": [_bench("fused", "fwd+bwd", 1e-4, op="self_attention", pairs=pairs, exps=2 * pairs)]}
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(data))
    r = subprocess.run([sys.executable, REPORT, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "sa.md").read_text()
    assert "| 1342.2 | 69% |" in md


def test_report_skips_other_json_and_shows_max_batch(tmp_path):
    other = tmp_path / "saved_memory_cpu.json"
    other.write_text(json.dumps({"rows": []}))
    (tmp_path / "saved_memory_cpu.md").write_text("keep me")
    data = {"benchmarks": [_bench("reference", "fwd", 2e-3, max_batch=48), _bench("fused", "fwd", 1e-3, max_batch=160)]}
    (tmp_path / "train.json").write_text(json.dumps(data))
    r = subprocess.run([sys.executable, REPORT, str(other), str(tmp_path / "train.json")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "saved_memory_cpu.md").read_text() == "keep me"
    md = (tmp_path / "train.md").read_text()
    assert "reference max batch" in md and "| 48 | 160 |" in md


def test_report_drops_a_compile_row_that_did_not_run_compiled(tmp_path):
    ok = {"backend": "inductor", "graphs": 1, "graph_calls": 20, "calls": 20, "valid": True}
    bad = {**ok, "graph_calls": 0, "valid": False, "reason": "eager fall-back"}
    data = {"benchmarks": [_bench("eager", "fwd", 4e-3), _bench("compile", "fwd", 2e-3, compile=bad),
                           _bench("fused", "fwd", 1e-3), _bench("compile", "bwd", 2e-3, compile=ok),
                           _bench("fused", "bwd", 1e-3)]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    r = subprocess.run([sys.executable, REPORT, str(tmp_path / "c.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "c.md").read_text()
    fwd = next(ln for ln in md.splitlines() if "| fwd |" in ln)
    assert "2.000" not in fwd and "| — |" in fwd  # the eager-in-disguise compile time is not reported
    assert "backend inductor" in md
