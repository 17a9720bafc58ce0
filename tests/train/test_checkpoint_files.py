"""Checkpoint files from disk are data, never code, and a bad one is one ``error:`` line (issue 14 items 1, 8)."""
import os
import random

import numpy as np
import pytest
import torch

from attnfast.cli import main
from attnfast.data import write_dataset
from attnfast.train import ConfigError, TrainConfig, Trainer, load_model, train
from attnfast.train.checkpoint import load_checkpoint, rng_state, set_rng_state

TINY = ["--image-size", "32", "--width-mult", "0.125", "--epochs", "1", "--batch-size", "8", "--no-progress"]
TINY_CFG = dict(image_size=32, width_mult=0.125, epochs=1, batch_size=8, progress=False, workers=0)


@pytest.fixture(scope="module")
def melanoma(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("ck") / "m"), layout="marking", n=20, size=40, seed=5)


@pytest.fixture(scope="module")
def run(melanoma, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckrun") / "run")
    train(TrainConfig(data=f"melanoma:{melanoma}", out=out, **TINY_CFG), log=lambda *_: None)
    return out


def _lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


class _Payload:
    """Unpickling this runs ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(path, marker, real):
    """A real checkpoint with a payload hidden in it (the file is otherwise complete and valid)."""
    ck = torch.load(real, weights_only=True)
    ck["meta"]["payload"] = _Payload(marker)
    torch.save(ck, path)
    return path


def test_malicious_best_pt_for_predict_runs_nothing(melanoma, run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _malicious(str(tmp_path / "best.pt"), marker, os.path.join(run, "best.pt"))
    code = main(["predict", "--checkpoint", evil, "--data", f"melanoma:{melanoma}", "--out",
                 str(tmp_path / "s.csv"), "--no-progress"])
    lines = _lines(capsys)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: --checkpoint {evil}: not a readable"), lines
    assert "never unpickles" in lines[0]
    assert not (tmp_path / "s.csv").exists()
    # control: torch.load with weights_only=False would have run it (the test can fail)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_malicious_last_pt_under_resume_runs_nothing(melanoma, run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    out.mkdir()
    _malicious(str(out / "last.pt"), marker, os.path.join(run, "last.pt"))
    code = main(["train", "--data", f"melanoma:{melanoma}", "--out", str(out), "--resume", *TINY])
    lines = _lines(capsys)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: --resume {out}/last.pt: not a readable")


def test_checkpoints_load_with_torch_defaults_and_load_model(melanoma, run):
    for name in ("best.pt", "last.pt"):
        ck = torch.load(os.path.join(run, name))  # torch's default (weights_only=True) reads every entry
        assert ck["epoch"] == 1 and ck["attnfast_checkpoint"] == 2 and ck["meta"]["model"] == "attnvgg"
    model = load_model(os.path.join(run, "best.pt"))
    assert not model.training and type(model).__name__ == "AttnVGG"
    x = torch.randn(2, 3, 32, 32)
    again = load_model(os.path.join(run, "best.pt"), attention="reference")
    torch.testing.assert_close(model(x)[0], again(x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_model(os.path.join(run, "nope.pt"))


def test_rng_state_is_tensors_and_round_trips():
    state = rng_state()
    assert isinstance(state["python"]["state"], torch.Tensor) and isinstance(state["numpy"]["keys"], torch.Tensor)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_format_1_checkpoint_still_resumes(melanoma, run, tmp_path):
    """attnfast's earlier checkpoints kept NumPy's RNG state as an ndarray: they load (four NumPy globals
    allowed, nothing else) and resume."""
    out = tmp_path / "old"
    out.mkdir()
    ck = load_checkpoint(os.path.join(run, "last.pt"))
    ck["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    ck["attnfast_checkpoint"] = 1
    del ck["meta"]["data_digest"]
    torch.save(ck, out / "last.pt")
    summary = train(TrainConfig(data=f"melanoma:{melanoma}", out=str(out), resume=True,
                                **dict(TINY_CFG, epochs=2)), log=lambda *_: None)
    assert summary["epochs"] == 2 and len(summary["final"]) > 0


def _zero(path, good):
    open(path, "wb").close()


def _truncated(path, good):
    data = open(good, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _random_bytes(path, good):
    open(path, "wb").write(np.random.default_rng(0).bytes(4096))


def _not_a_dict(path, good):
    torch.save([1, 2, 3], path)


def _missing_entries(path, good):
    ck = torch.load(good)
    del ck["optimizer"]
    torch.save(ck, path)


def _wrong_shapes(path, good):
    ck = torch.load(good)
    ck["model"] = {k: torch.zeros(3, 3) for k in ck["model"]}
    torch.save(ck, path)


def _wrong_rng(path, good):
    ck = torch.load(good)
    ck["rng"] = {"python": 7}
    torch.save(ck, path)


@pytest.mark.parametrize("breaker,expected", [
    (_zero, "not a readable attnfast checkpoint"), (_truncated, "not a readable attnfast checkpoint"),
    (_random_bytes, "not a readable attnfast checkpoint"), (_not_a_dict, "not an attnfast checkpoint"),
    (_missing_entries, "'optimizer'"), (_wrong_shapes, "do not fit the model"),
    (_wrong_rng, "training state does not fit"),
])
def test_bad_last_pt_on_resume_is_one_line(melanoma, run, tmp_path, capsys, breaker, expected):
    out = tmp_path / "run"
    out.mkdir()
    breaker(str(out / "last.pt"), os.path.join(run, "last.pt"))
    before = open(out / "last.pt", "rb").read()
    code = main(["train", "--data", f"melanoma:{melanoma}", "--out", str(out), "--resume", *TINY])
    lines = _lines(capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --resume"), lines
    assert expected in lines[0] and str(out / "last.pt") in lines[0], lines[0]
    assert open(out / "last.pt", "rb").read() == before  # the user's file is untouched


def test_trainer_api_raises_config_error_for_a_bad_last_pt(melanoma, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a readable"):
        Trainer(TrainConfig(data=f"melanoma:{melanoma}", out=str(out), resume=True, **TINY_CFG))
