"""ci/main_job.py, the CI guard of the README's main job: its README parsing, its checks, its time limit.

The guard itself runs the real main job in CI (about 30 s); here it runs a tiny job from a stand-in README.
"""
import importlib.util
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("main_job", os.path.join(ROOT, "ci", "main_job.py"))
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)


def _readme(tmp_path, body):
    path = tmp_path / "README.md"
    path.write_text(body)
    return str(path)


def test_the_readme_main_job_is_attnfast_train_as_written():
    assert guard.readme_command(os.path.join(ROOT, "README.md")) == ["attnfast", "train"]


def test_readme_parsing(tmp_path):
    body = "intro\n```python\nattnfast train --no\n```\n**Train**\n```bash\npip install -e . && attnfast train " \
           "--epochs 2  # comment\n```\n```bash\nattnfast train --later\n```\n"
    assert guard.readme_command(_readme(tmp_path, body)) == ["attnfast", "train", "--epochs", "2"]
    with pytest.raises(guard.GuardError, match="no ```bash block with an `attnfast train` command"):
        guard.readme_command(_readme(tmp_path, "```bash\npip install attnfast\n```\n"))


def _run_dir(tmp_path, auc, count, epoch=4):
    run = tmp_path / "runs" / "attnvgg-synthetic-1"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(f"epoch,train_loss,val_loss,val_count,val_auc\n1,0.1,0.1,{count},0.5\n"
                                     f"{epoch},0.1,0.1,{count},{auc}\n")
    return str(tmp_path)


HEADER = "attnfast train: attnvgg (fused attention) on synthetic [1600 train / 400 val, 2 classes], 64px\n"


def test_checks_read_the_last_epoch_of_the_whole_split(tmp_path):
    assert guard.check_run(_run_dir(tmp_path / "ok", 0.95, 400), HEADER, 0.9) == (0.95, 400)
    with pytest.raises(guard.GuardError, match="validation AUC 0.8500 at epoch 4 is below 0.9"):
        guard.check_run(_run_dir(tmp_path / "low", 0.85, 400), HEADER, 0.9)
    with pytest.raises(guard.GuardError, match="below 0.9"):
        guard.check_run(_run_dir(tmp_path / "nan", "nan", 400), HEADER, 0.9)
    with pytest.raises(guard.GuardError, match="covers 32 images, not the whole validation split \\(400\\)"):
        guard.check_run(_run_dir(tmp_path / "part", 0.99, 32), HEADER, 0.9)
    with pytest.raises(guard.GuardError, match="found 0"):
        guard.check_run(str(tmp_path / "none"), HEADER, 0.9)


def test_a_job_past_the_limit_is_killed(tmp_path, capsys):
    t0 = time.monotonic()
    code, elapsed, output = guard.run([sys.executable, "-c", "import time; print('started', flush=True); "
                                       "time.sleep(60)"], str(tmp_path), dict(os.environ), limit_s=2)
    assert code is None and 2 <= elapsed < 20 and time.monotonic() - t0 < 30
    assert output == "started\n" and capsys.readouterr().out == "started\n"  # echoed as it ran


def test_guard_runs_a_readme_job_in_a_fresh_folder(tmp_path, capsys, monkeypatch):
    readme = _readme(tmp_path, "```bash\npip install -e . && attnfast train --synthetic-n 20 --synthetic-size 32 "
                               "--image-size 32 --epochs 1 --batch-size 8\n```\n")
    if guard.shutil.which("attnfast", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]) is None:
        pytest.skip("attnfast console script not installed")
    work = tmp_path / "work"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model: a second thread only spins on a shared machine
    assert guard.main(["--readme", readme, "--workdir", str(work), "--min-auc", "0"]) == 0
    out = capsys.readouterr().out
    assert "main job: OK: validation AUC" in out and "over all 4 validation images" in out, out
    assert "not passed on: " in out and "TRITON_INTERPRET" in out  # conftest's setting stays out of the job
    assert os.listdir(work / "cache") == ["synthetic"]  # the fresh cache, not the user's
    assert len(os.listdir(work / "runs")) == 1
    # an existing --workdir is refused (the guard never reuses a run or a cache)
    assert guard.main(["--readme", readme, "--workdir", str(work)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_time_past_the_limit_is_judged_against_the_reference_baseline():
    assert guard.check_time(100.0, 300.0, None, 1.5) == "100.0 s (<= 300 s)"
    assert "1.20x the reference-attention run's 500.0 s" in guard.check_time(600.0, 300.0, 500.0, 1.5)
    with pytest.raises(guard.GuardError, match="2.00x the reference-attention run's 300.0 s .*attnfast is slow"):
        guard.check_time(600.0, 300.0, 300.0, 1.5)
    with pytest.raises(guard.GuardError, match="no baseline ran"):
        guard.check_time(600.0, 300.0, None, 1.5)


@pytest.mark.parametrize("times,ok", [((400.0, 380.0), True), ((400.0, 100.0), False), ((10.0, None), True)])
def test_a_slow_job_runs_the_reference_baseline(tmp_path, capsys, monkeypatch, times, ok):
    """Past --limit-s the guard runs the same command with --attention reference in its own folder and
    passes when the job is within --max-ratio of it (a busy CI machine slows both alike)."""
    readme = _readme(tmp_path, "```bash\nattnfast train --epochs 1\n```\n")
    calls = []

    def fake_run(argv, cwd, env, limit_s, echo=None):
        calls.append((argv[1:], cwd, env["ATTNFAST_CACHE"], limit_s))
        return 0, times[len(calls) - 1], HEADER

    monkeypatch.setattr(guard, "run", fake_run)
    monkeypatch.setattr(guard, "resolve", lambda argv: ["attnfast"] + argv[1:])
    monkeypatch.setattr(guard, "check_run", lambda workdir, output, min_auc: (0.99, 400))
    work = tmp_path / "work"
    assert guard.main(["--readme", readme, "--workdir", str(work), "--limit-s", "300"]) == (0 if ok else 1)
    if times[1] is None:
        assert len(calls) == 1
        return
    (job, job_cwd, job_cache, hard), (base, base_cwd, base_cache, _) = calls
    assert job == ["train", "--epochs", "1"] and base == ["train", "--epochs", "1", "--attention", "reference"]
    assert base_cwd == str(work / "baseline") and base_cache != job_cache and hard == 3600.0
    captured = capsys.readouterr()
    assert ("main job: OK" in captured.out) == ok
    assert ok or "attnfast is slow" in captured.err
