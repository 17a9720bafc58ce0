"""The run folder: nothing a user had is lost or overwritten, the files on disk always agree with each other, and
a folder that cannot be written stops the run up front with one line (issue 14 items 4, 5, 8)."""
import csv
import errno
import json
import os
import shutil

import pytest
import torch

import attnfast.train.checkpoint as checkpoint
import attnfast.train.run_dir as run_dir
from attnfast.cli import main
from attnfast.data import write_dataset
from attnfast.train import TrainConfig, train

TINY = ["--image-size", "32", "--width-mult", "0.125", "--epochs", "1", "--batch-size", "8", "--no-progress"]
TINY_CFG = dict(image_size=32, width_mult=0.125, epochs=1, batch_size=8, progress=False, workers=0, lr=1e-3)


@pytest.fixture(scope="module")
def melanoma(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("rf") / "m"), layout="marking", n=20, size=40, seed=5)


def _lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _train(argv, capsys):
    code = main(["train", *argv])
    return code, _lines(capsys)


def _snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


# ------------------------------------------------------------------------------------------------ refusals
def test_folder_with_run_files_but_no_last_pt_is_not_overwritten(melanoma, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.pt", "metrics.csv", "summary.json"):
        (out / name).write_text(f"the user's {name}")
    before = _snapshot(out)
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), *TINY], capsys)
    assert code == 2 and len(lines) == 1 and "already holds files of a run" in lines[0], lines
    assert "best.pt, metrics.csv, summary.json" in lines[0]
    assert _snapshot(out) == before
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), "--resume", *TINY], capsys)
    assert code == 2 and lines[0].startswith(f"error: --resume: no checkpoint at {out}/last.pt"), lines
    assert _snapshot(out) == before


def test_out_that_is_a_file(melanoma, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), *TINY], capsys)
    assert code == 2 and lines == [f"error: --out {out} is a file, not a folder"]
    assert out.read_text() == "mine"


def test_unwritable_out_is_refused_before_any_epoch(melanoma, tmp_path, capsys, monkeypatch):
    """A read-only folder (simulated: this suite may run as root, whom permission bits do not stop)."""
    calls = []

    def read_only(*args, **kwargs):
        calls.append(kwargs.get("dir"))
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(run_dir.tempfile, "mkstemp", read_only)
    monkeypatch.setattr("attnfast.train.loop.Trainer.train_epoch", lambda *a: pytest.fail("an epoch ran"))
    out = tmp_path / "ro"
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), *TINY], capsys)
    assert calls and code == 2
    assert lines == [f"error: --out {out}: cannot write there (Read-only file system)"]
    assert not out.exists()  # the probe's folder is removed again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0555 folder")
def test_read_only_folder(melanoma, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), *TINY], capsys)
    finally:
        out.chmod(0o755)
    assert code == 2 and "cannot write there" in lines[0]


def test_symlinked_overlays_is_not_followed(melanoma, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "overlays").symlink_to(outside)
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), *TINY], capsys)
    assert code == 2 and len(lines) == 1 and "overlays is a symbolic link" in lines[0], lines
    assert os.listdir(outside) == [] and sorted(os.listdir(out)) == ["overlays"]


# ------------------------------------------------------------------------------------------------ consistency
class _Killed(BaseException):
    """Stands for kill -9: no except/finally of attnfast's gets to clean up (BaseException passes them)."""


def _kill_at(monkeypatch, owner, name, when):
    """Make ``owner.name`` raise :class:`_Killed` on the call for which ``when(args)`` is true."""
    real = getattr(owner, name)

    def fake(*args, **kwargs):
        if when(args):
            raise _Killed
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, fake)


def _consistent(out, epochs):
    summary = json.load(open(os.path.join(out, "summary.json")))
    best = torch.load(os.path.join(out, "best.pt"))
    last = torch.load(os.path.join(out, "last.pt"))
    assert last["epoch"] == epochs and summary["best_epoch"] == last["best_epoch"] == best["epoch"]
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f == "best.pending.pt"]


@pytest.mark.parametrize("kill", ["writing best", "between last and best"])
def test_killed_between_checkpoint_writes_then_resumed(melanoma, tmp_path, monkeypatch, kill):
    cfg = dict(data=f"melanoma:{melanoma}", out=str(tmp_path / "run"), **dict(TINY_CFG, epochs=2))
    with monkeypatch.context() as m:
        if kill == "writing best":  # epoch 1: its best checkpoint is being written when the process dies
            _kill_at(m, run_dir, "save_checkpoint", lambda a: a[1].endswith("best.pending.pt"))
        else:  # last.pt of epoch 1 is written; best.pt is not replaced yet
            _kill_at(m, run_dir.os, "replace", lambda a: str(a[0]).endswith("best.pending.pt"))
        with pytest.raises(_Killed):
            train(TrainConfig(**cfg), log=lambda *_: None)
    logs = []
    train(TrainConfig(resume=True, **cfg), log=logs.append)
    _consistent(cfg["out"], 2)
    if kill == "between last and best":
        assert any("completed the replacement by epoch 1" in line for line in logs), logs


def test_stale_temporaries_are_removed(melanoma, tmp_path):
    out = tmp_path / "run"
    cfg = dict(data=f"melanoma:{melanoma}", out=str(out), **TINY_CFG)
    train(TrainConfig(**cfg), log=lambda *_: None)
    stale = [out / ".last.pt.abc123.tmp", out / ".best.pt.x9.tmp", out / "overlays" / ".epoch_002.png.q1.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (out / ".notes.txt").write_text("the user's")  # not attnfast's: left alone
    logs = []
    train(TrainConfig(resume=True, **dict(cfg, epochs=2)), log=logs.append)
    assert not any(p.exists() for p in stale) and (out / ".notes.txt").exists()
    assert any("removed 3 temporary file(s)" in line for line in logs), logs


def test_disk_full_is_one_line_and_keeps_the_old_checkpoint(melanoma, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--data", f"melanoma:{melanoma}", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    before = _snapshot(out)

    def full(state, f):  # the writer fails as a full disk makes it fail
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), "--resume", *TINY[:-3],
                          "--epochs", "2", "--no-progress", "--batch-size", "8"], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot write ") and "the disk is full" in lines[0], lines[0]
    assert "still hold epoch 1" in lines[0]
    after = _snapshot(out)
    assert {k: v for k, v in after.items()} == before  # last.pt, best.pt, metrics.csv, summary.json unchanged
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f == "best.pending.pt"]


# ------------------------------------------------------------------------------------------------ divergence
def test_infinite_lr_stops_with_one_line(melanoma, tmp_path, capsys):
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(tmp_path / "o"), "--lr", "inf", *TINY],
                         capsys)
    assert code == 2 and lines == ["error: --lr must be a positive finite number; got inf"]


def test_diverging_run_stops_and_keeps_the_last_good_epoch(melanoma, tmp_path, capsys, monkeypatch):
    import attnfast.train.loop as loop

    out = tmp_path / "run"
    real = loop.compute_loss
    steps = []

    def explodes_in_epoch_2(logits, y, task, reduction="mean"):
        steps.append(1)
        loss = real(logits, y, task, reduction)
        return loss * float("nan") if len(steps) == 4 else loss  # 16 train images, batch 8: epoch 2, step 2
    monkeypatch.setattr(loop, "compute_loss", explodes_in_epoch_2)
    code, lines = _train(["--data", f"melanoma:{melanoma}", "--out", str(out), *TINY[:-3], "--epochs", "3",
                          "--batch-size", "8", "--no-progress"], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: training diverged: the loss became nan at epoch 2, step 2 of 2"), lines[0]
    assert "hold the last good epoch (1)" in lines[0]
    assert torch.load(out / "last.pt")["epoch"] == 1 and torch.load(out / "best.pt")["epoch"] == 1
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 1


# ------------------------------------------------------------------------------------------------ data changes
def test_resume_refuses_a_changed_dataset(melanoma, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(melanoma, data)
    out = tmp_path / "run"
    assert main(["train", "--data", f"melanoma:{data}", "--out", str(out), *TINY]) == 0
    summary = json.load(open(out / "summary.json"))
    assert len(summary["data"]["listing_sha256"]) == 64 and summary["data"]["images"] == 20
    assert summary["data"]["train"] + summary["data"]["val"] == 20
    capsys.readouterr()
    listing = os.path.join(data, "marking.csv")
    rows = open(listing).read().splitlines()
    open(listing, "w").write("\n".join(rows[:-3]) + "\n")  # three images fewer: another split
    code, lines = _train(["--data", f"melanoma:{data}", "--out", str(out), "--resume", *TINY[:-3], "--epochs", "2",
                          "--batch-size", "8", "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1 and "changed since" in lines[0], lines
    assert "20 images listed then, 17 now" in lines[0]


# ------------------------------------------------------------------------------------------------ predict --out
def test_predict_never_overwrites_its_inputs(melanoma, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(melanoma, data)
    out = tmp_path / "run"
    assert main(["train", "--data", f"melanoma:{data}", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    best = str(out / "best.pt")
    image = os.path.join(data, "512x512-dataset-melanoma", "512x512-dataset-melanoma", "ISIC_0000003.jpg")
    for target in (os.path.join(data, "marking.csv"), best, image):
        before = open(target, "rb").read()
        code = main(["predict", "--checkpoint", best, "--data", f"melanoma:{data}", "--out", target, "--no-progress"])
        lines = _lines(capsys)
        assert code == 2 and len(lines) == 1 and "is an input of this prediction" in lines[0], lines
        assert open(target, "rb").read() == before
    code = main(["predict", "--checkpoint", best, "--data", f"melanoma:{data}", "--out", data, "--no-progress"])
    assert code == 2 and "is a folder" in _lines(capsys)[0]
