"""``attnfast train --model resnet50-cbam`` (any timm model): reference = timm's own modules, fused = attnfast.swap.

Sizes are CPU-test sized: images 32 px, batch 2-10. resnet50-cbam is built and takes one training step (a whole
tiny run of it costs about 18 CPU-s here); the whole CLI run and ``predict`` use resnet18-cbam (same timm
``CbamModule``, 8 of them instead of 16).
"""
import csv
import os
import sys

import numpy as np
import pytest
import torch

import attnfast.config
import attnfast.swap
from attnfast.cli import main
from attnfast.data import write_dataset
from attnfast.train import TrainConfig, Trainer, predict
from attnfast.train.checkpoint import load_checkpoint

pytest.importorskip("timm")

TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "10", "--no-progress"]


@pytest.fixture(scope="module")
def cassava(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("timm") / "c"), layout="cassava", n=25, size=40, seed=3)


@pytest.fixture
def swap_calls(monkeypatch):
    """Every model attnfast.swap is called on (the real swap still runs)."""
    calls = []
    real = attnfast.swap.swap

    def spy(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)
    monkeypatch.setattr(attnfast.swap, "swap", spy)
    return calls


def _cbam_count(model):
    return sum(type(m).__name__ in ("CbamModule", "LightCbamModule") for m in model.modules())


def test_resnet50_cbam_fused_goes_through_swap(cassava, tmp_path, swap_calls):
    cfg = TrainConfig(data=f"cassava:{cassava}", model="resnet50-cbam", image_size=32, batch_size=2, epochs=1,
                      progress=False, out=str(tmp_path / "r50"))
    t = Trainer(cfg, log=lambda *_: None)
    assert len(swap_calls) == 1 and swap_calls[0] is t.raw_model  # swapped in place, then trained
    assert type(t.raw_model).__module__.startswith("timm.") and t.raw_model.fc.out_features == 5
    # the report says what swap replaced: every one of the 16 timm CbamModules became attnfast's fused CBAM
    assert t.build_notes == ["attnfast.swap replaced 16 modules of resnet50-cbam with fused ones "
                             "(16 CbamModule -> CBAM)"], t.build_notes
    assert _cbam_count(t.raw_model) == 0
    assert sum(type(m).__module__.startswith("attnfast.nn") for m in t.raw_model.modules()) == 16
    x, y = next(iter(t._train_loader(0)))
    loss = t.train_step(x, y)
    assert torch.isfinite(loss)


def test_resnet18_cbam_reference_trains_and_predicts(cassava, tmp_path, swap_calls, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", f"cassava:{cassava}", "--model", "resnet18-cbam", "--attention", "reference",
                 "--out", out, *TINY]) == 0
    assert swap_calls == []  # reference: timm's CbamModule, untouched
    stdout = capsys.readouterr().out
    assert "resnet18-cbam (reference attention)" in stdout and "attnfast.swap" not in stdout
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["val_count"]) == 5 and np.isfinite(float(row["val_acc"]))
    ck = load_checkpoint(os.path.join(out, "best.pt"))
    assert ck["meta"]["model"] == "resnet18-cbam" and ck["meta"]["attention"] == "reference"
    assert any(".se.fc" in k or ".se." in k for k in ck["model"])  # timm's CBAM parameters are in the weights
    sub = str(tmp_path / "submission.csv")
    assert predict(os.path.join(out, "best.pt"), f"cassava:{cassava}", sub, progress=False) == 25
    # predict with --attention fused rebuilds the timm model and hands it to swap
    assert predict(os.path.join(out, "best.pt"), f"cassava:{cassava}", sub, attention="fused",
                   progress=False) == 25
    assert len(swap_calls) == 1 and type(swap_calls[0]).__name__ == "ResNet"


@pytest.mark.parametrize("argv,expected", [
    (["--model", "resnet50-cbam"], "--model resnet50-cbam is a timm model, but timm is not installed "
                                   "(pip install timm, or pip install 'attnfast[timm]')"),
])
def test_without_timm_one_error_line_before_any_data(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    cache = tmp_path / "cache"
    monkeypatch.setattr(attnfast.config, "CACHE_DIR", str(cache))
    code = main(["train", *argv, "--out", str(tmp_path / "o")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and lines == ["error: " + expected], lines
    assert not cache.exists() and not (tmp_path / "o").exists()  # nothing generated, nothing written


@pytest.mark.parametrize("argv,expected", [
    (["--model", "nope-cbam"], "'nope' is not a timm model name"),
    (["--model", "resnet18-cbam", "--width-mult", "0.5"], "--width-mult scales attnfast's models"),
    (["--model", "resnet18-cbam", "--pretrained"], "built with pretrained=False"),
    (["--model", "resnet18-cbam", "--sigmoid-attn"], "--sigmoid-attn is AttnVGG's"),
])
def test_timm_option_errors(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(attnfast.config, "CACHE_DIR", str(tmp_path / "cache"))
    code = main(["train", *argv, "--out", str(tmp_path / "o")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "cache").exists()


def test_block_args_on_another_architecture_is_one_line(cassava, tmp_path, capsys):
    code = main(["train", "--data", f"cassava:{cassava}", "--model", "vit_tiny_patch16_224-cbam",
                 "--out", str(tmp_path / "o"), *TINY])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "takes no block_args" in lines[0], lines
