"""benchmarks/cpu_load.py: a dry run at tiny size (--quick) with one busy process."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import cpu_load  # noqa: E402


def test_quick_run_records_load_and_stops_its_busy_processes(tmp_path, monkeypatch):
    started = []
    start = cpu_load.start_busy
    monkeypatch.setattr(cpu_load, "start_busy", lambda n: started.extend(start(n)) or started[-n:] if n else [])
    out = str(tmp_path / "load")
    cpu_load.main(["--quick", "--cases", "residual_gate", "--busy", "1", "--out", out])
    assert len(started) == 1 and all(p.poll() is not None for p in started)  # the spinner is gone
    res = json.load(open(out + ".json"))
    assert res["busy_levels"] == [1]
    for key in ("torch", "device", "date_time_utc", "cpu_count", "load_average_at_start", "load_average_at_end",
                "commit", "threading_env"):
        assert key in res["info"], key
    rows = {(r["busy"], r["provider"]): r for r in res["summary"]}
    assert set(rows) == {(1, "fused"), (1, "eager")}
    for r in rows.values():
        assert r["ok"], r
        assert r["median_s"] > 0 and r["cpu_median_s"] >= 0 and r["load_max"] >= r["load_min"] >= 0
        assert r["saved_bytes"] > 0 and r["ratio_vs_best_other"] > 0
    md = open(out + ".md").read()
    assert "## residual_gate" in md and "| 1 |" in md and "ratio vs best other" in md


def test_a_failed_run_is_reported_beside_the_median():
    ok = {"ok": True, "wall_s": [1.0, 2.0], "cpu_s": [1.0, 2.0], "load_before": 0.1, "load_after": 0.2}
    runs = [dict(ok, busy=0, case="cbam", provider="fused", round=0),
            {"busy": 0, "case": "cbam", "provider": "fused", "round": 1, "ok": False, "error": "timed out"},
            dict(ok, busy=0, case="cbam", provider="eager", round=0)]
    rows = {r["provider"]: r for r in cpu_load.summarize(runs)}
    assert rows["fused"]["ok"] and rows["fused"]["failed_runs"] == ["timed out"] and rows["fused"]["runs"] == 2
    res = {"info": {"device": "cpu", "torch": "t", "triton": "t", "python": "p", "date_time_utc": "d",
                    "cpu_count": 2, "load_average_at_start": [0.0], "load_average_at_end": [0.0],
                    "command": "c"},
           "summary": cpu_load.summarize(runs), "busy_levels": [0], "threads": 0, "steps": 2, "rounds": 2,
           "note": "", "sizes": {"cbam": {}}}
    assert "fused (1 of 2 runs failed: timed out)" in cpu_load.markdown(res)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        cpu_load.main(["--busy", "-1"])
    assert "--busy counts must be >= 0" in capsys.readouterr().err
