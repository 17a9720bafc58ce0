"""attnfast.train: tiny end-to-end runs in every layout, resume equivalence, 2-process DDP, metrics, overlays."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from attnfast.data import write_dataset
from attnfast.train import TrainConfig, compute_loss, predict, train
from attnfast.train.config import ConfigError
from attnfast.train.checkpoint import atomic_write, load_checkpoint
from attnfast.train.metrics import attention_mass_inside, binary_metrics, mask_area, multiclass_metrics

TINY = dict(epochs=1, batch_size=8, progress=False, workers=0, lr=1e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {layout: write_dataset(str(root / layout), layout=layout, n=25, size=48, seed=3)
            for layout in ("marking", "siim", "cassava", "folder")}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# (layout, --data kind, model, attention, image size, amp): every layout, both models, both attention paths
E2E = [
    ("marking", "melanoma", "attnvgg", "fused", 32, "off"),
    ("siim", "melanoma", "attnvgg", "reference", 32, "off"),
    ("cassava", "cassava", "ran56", "fused", 64, "bf16"),
    ("folder", "folder", "ran56", "reference", 64, "off"),
]


@pytest.mark.parametrize("layout,kind,model,attention,size,amp", E2E)
def test_tiny_end_to_end(data, tmp_path, layout, kind, model, attention, size, amp):
    out = str(tmp_path / "run")
    logs = []
    summary = train(TrainConfig(data=f"{kind}:{data[layout]}", model=model, attention=attention, image_size=size,
                                width_mult=0.125, out=out, amp=amp, **TINY), log=logs.append)
    assert summary["epochs"] == 1 and os.path.isfile(os.path.join(out, "summary.json"))
    for name in ("last.pt", "best.pt", "metrics.csv", os.path.join("overlays", "epoch_001.png")):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    (row,) = _rows(os.path.join(out, "metrics.csv"))
    assert int(row["val_count"]) == 5  # the whole validation split, not one batch
    binary = kind != "cassava"
    keys = ("val_auc", "val_ap") if binary else ("val_acc", "val_acc_class0", "val_acc_class4")
    for k in keys:
        assert k in row and np.isfinite(float(row[k])), k
    assert any(k.startswith("loc_") for k in row)  # the synthetic masks give a localization score
    assert np.isfinite(float(row["train_loss"]))
    with Image.open(os.path.join(out, "overlays", "epoch_001.png")) as im:
        assert im.size[0] > 200 and im.size[1] > 150
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["epoch"] == 1 and ck["meta"]["task"] == ("binary" if binary else "multiclass")
    assert ck["meta"]["attention"] == attention
    # predict writes the Kaggle format, atomically
    sub = str(tmp_path / "submission.csv")
    n = predict(os.path.join(out, "best.pt"), f"{kind}:{data[layout]}", sub, progress=False)
    rows = _rows(sub)
    assert n == len(rows) == 25
    if binary:
        assert list(rows[0]) == ["image_name", "target"] and 0 <= float(rows[0]["target"]) <= 1
    else:
        assert list(rows[0]) == ["image_id", "label"] and rows[0]["image_id"].endswith(".jpg")
        assert 0 <= int(rows[0]["label"]) < 5
    # unlabeled folder: ids as Kaggle's sample submissions write them (melanoma ISIC_x, cassava NNN.jpg)
    predict(os.path.join(out, "best.pt"), f"folder:{data[layout]}", sub, progress=False)
    ids = [r["image_name" if binary else "image_id"] for r in _rows(sub)]
    assert len(ids) == 25 and all(i.endswith(".jpg") != binary for i in ids), ids[:3]


class _Interrupt(Exception):
    pass


def _stop_after_epoch(k):
    def log(line):
        if line.startswith(f"epoch {k} |"):  # logged after the epoch's checkpoint is written
            raise _Interrupt
    return log


def test_resume_equals_uninterrupted(data, tmp_path):
    # dropout (RNG), augmentation (RNG), a cosine schedule and Adam state all have to continue exactly
    base = dict(data=f"melanoma:{data['marking']}", model="attnvgg", attention="fused", image_size=32,
                width_mult=0.125, batch_size=8, progress=False, workers=0, lr=1e-3, dropout=0.3,
                scheduler="cosine", epochs=3)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(TrainConfig(out=full, **base), log=lambda *_: None)
    with pytest.raises(_Interrupt):
        train(TrainConfig(out=part, **base), log=_stop_after_epoch(1))
    assert load_checkpoint(os.path.join(part, "last.pt"))["epoch"] == 1
    with pytest.raises(ConfigError, match="--resume"):  # no silent overwrite of a run
        train(TrainConfig(out=part, **base), log=lambda *_: None)
    other = dict(base, split_seed=7, attention="reference", max_benign=3)
    with pytest.raises(ConfigError) as e:  # another split or model is another run, not a continuation
        train(TrainConfig(out=part, resume=True, **other), log=lambda *_: None)
    assert all(f"--{k}" in str(e.value) for k in ("split-seed", "attention", "max-benign")), str(e.value)
    train(TrainConfig(out=part, resume=True, **base), log=lambda *_: None)
    a, b = load_checkpoint(os.path.join(full, "last.pt")), load_checkpoint(os.path.join(part, "last.pt"))
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    drop = {"epoch_time_s", "epoch_cpu_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b["history"]]
    assert len(_rows(os.path.join(part, "metrics.csv"))) == 3


def test_ddp_two_cpu_processes(data, tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTNFAST_BACKEND="torch")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "attnfast.cli",
           "train", "--data", f"melanoma:{data['marking']}", "--image-size", "32", "--width-mult", "0.125",
           "--epochs", "2", "--batch-size", "4", "--out", out, "--no-progress", "--lr", "1e-3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("attnfast train:") == 1  # only rank 0 reports and writes
    assert "x2" in proc.stdout
    rows = _rows(os.path.join(out, "metrics.csv"))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(int(r["val_count"]) == 5 for r in rows)  # gathered from both ranks, padding dropped
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    assert not any(k.startswith("module.") for k in ck["model"])  # saved unwrapped
    assert sorted(os.listdir(os.path.join(out, "overlays"))) == ["epoch_001.png", "epoch_002.png"]
    # the same --out again: every rank stops with the one-line error (not rank 0 alone)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: " + out + " already holds a run") == 2, proc.stderr[-3000:]


def test_focal_loss_is_the_seeds_and_ce_for_multiclass():
    def seed_focal(x, t):  # the seeds' FocalLoss, alpha=0.25 for every sample: alpha * (1 - pt)**2 * BCE
        bce = math.log1p(math.exp(-x)) if t else math.log1p(math.exp(x))
        return 0.25 * (1 - math.exp(-bce)) ** 2 * bce
    xs, ts = [0.0, 0.0, 2.0, -1.0, 3.0], [1, 0, 0, 1, 1]
    assert seed_focal(0.0, 0) == pytest.approx(0.0625 * math.log(2))  # a negative is weighted 0.25, not 0.75
    got = compute_loss(torch.tensor(xs).view(-1, 1), torch.tensor(ts), "binary")
    assert got.item() == pytest.approx(sum(map(seed_focal, xs, ts)) / len(xs), rel=1e-6)
    y = torch.tensor([0, 1, 1, 0, 0, 1])
    logits5 = torch.randn(6, 5)
    torch.testing.assert_close(compute_loss(logits5, y, "multiclass"), torch.nn.functional.cross_entropy(logits5, y))


def test_metrics():
    m = binary_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert m["auc"] == pytest.approx(0.75) and 0 < m["ap"] <= 1 and m["acc"] == pytest.approx(0.75)
    assert np.isnan(binary_metrics(np.array([0.2, 0.3]), np.array([1, 1]))["auc"])  # undefined, not invented
    mc = multiclass_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), 4)
    assert mc["acc"] == 0.75 and mc["acc_class1"] == 0.5 and np.isnan(mc["acc_class3"])


def test_localization_score():
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    inside = torch.zeros(2, 1, 4, 4)
    inside[:, :, 1:3, 1:3] = 1
    # bilinear upsampling (as the overlays show it) blurs the 2x2 block a little past the mask's edge
    assert (attention_mass_inside(inside, mask) > 0.7).all() and (mask_area(mask) == 0.25).all()
    uniform = torch.full((2, 1, 4, 4), 1 / 16)
    torch.testing.assert_close(attention_mass_inside(uniform, mask), mask_area(mask))
    outside = 1 - inside
    assert (attention_mass_inside(outside, mask) < 0.2).all()


def test_atomic_write_gives_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "m.csv"), lambda f: f.write("x"), mode="w")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.csv").st_mode & 0o777 == 0o644  # as open() would make it, not mkstemp's 0600


def test_checkpoint_of_a_pretrained_run_needs_no_imagenet_file(data, tmp_path, monkeypatch):
    # an offline machine without the hub's vgg16_bn file: predict and --resume rebuild with pretrained=False
    from attnfast.train import Trainer
    from attnfast.train.checkpoint import save_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    cfg = dict(data=f"melanoma:{data['marking']}", image_size=32, width_mult=1.0, out=str(tmp_path / "pre"),
               **dict(TINY, batch_size=32))
    trainer = Trainer(TrainConfig(**cfg), log=lambda *_: None)
    state = trainer._state(1)  # as the pretrained run would have saved it after its only epoch
    state["config"]["pretrained"] = state["meta"]["model_kwargs"]["pretrained"] = True
    save_checkpoint(state, os.path.join(cfg["out"], "last.pt"))
    train(TrainConfig(pretrained=True, resume=True, **cfg), log=lambda *_: None)
    assert predict(os.path.join(cfg["out"], "last.pt"), f"melanoma:{data['marking']}", str(tmp_path / "s.csv"),
                   progress=False) == 25


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "f.txt")
    atomic_write(path, lambda f: f.write("old"), mode="w")

    def boom(f):
        f.write("partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(path, boom, mode="w")
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_attnvgg_under_bf16_autocast(data, tmp_path, attention):
    train(TrainConfig(data=f"melanoma:{data['marking']}", attention=attention, image_size=32, width_mult=0.125,
                      out=str(tmp_path / "amp"), amp="bf16", **TINY), log=lambda *_: None)


def test_sagan_resnet_trains(data, tmp_path):
    out = str(tmp_path / "sagan")
    train(TrainConfig(data=f"melanoma:{data['marking']}", model="sagan_resnet", image_size=32, width_mult=0.125,
                      out=out, **TINY), log=lambda *_: None)
    (row,) = _rows(os.path.join(out, "metrics.csv"))
    assert np.isfinite(float(row["val_auc"]))


def test_summary_json_is_valid(data, tmp_path):
    out = str(tmp_path / "s")
    train(TrainConfig(data=f"melanoma:{data['marking']}", image_size=32, width_mult=0.125, out=out, **TINY),
          log=lambda *_: None)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["best_epoch"] == 1 and "val_auc" in s["final"]
