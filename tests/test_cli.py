"""The ``attnfast`` command line: bad data and bad options give one ``error:`` line and exit status 2."""
import csv
import os
import shutil
import subprocess
import sys

import pytest

from attnfast.cli import build_parser, main
from attnfast.data import write_dataset


@pytest.fixture(scope="module")
def melanoma(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("cli") / "m"), layout="marking", n=20, size=40, seed=5)


@pytest.fixture
def copy(melanoma, tmp_path):
    dst = str(tmp_path / "data")
    shutil.copytree(melanoma, dst)
    return dst


TINY = ["--image-size", "32", "--width-mult", "0.125", "--epochs", "1", "--batch-size", "8", "--no-progress"]


def _edit_csv(path, fn):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(fn(rows))


def _run_main(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _bad_column(root):
    _edit_csv(os.path.join(root, "marking.csv"), lambda r: [["image_id", "patient_id", "source", "benign"]] + r[1:])
    return ("marking.csv", "'target'")


def _missing_image(root):
    os.remove(os.path.join(root, "512x512-dataset-melanoma", "512x512-dataset-melanoma", "ISIC_0000004.jpg"))
    return ("marking.csv", "ISIC_0000004")


def _label_range(root):
    def fn(rows):
        rows[3][3] = "7"
        return rows
    _edit_csv(os.path.join(root, "marking.csv"), fn)
    return ("marking.csv", "'target'", "row 4")


def _empty_split(root):
    _edit_csv(os.path.join(root, "marking.csv"), lambda r: [r[0]] + [x for x in r[1:] if x[3] == "0"])
    return ("marking.csv", "one class")


def _corrupt_image(root):
    # the corrupt file is found while training (decoding), not while listing
    for name in os.listdir(os.path.join(root, "512x512-dataset-melanoma", "512x512-dataset-melanoma")):
        with open(os.path.join(root, "512x512-dataset-melanoma", "512x512-dataset-melanoma", name), "wb") as f:
            f.write(b"GIF89a garbage")
    return ("ISIC_", "corrupt")


@pytest.mark.parametrize("breaker", [_bad_column, _missing_image, _label_range, _empty_split, _corrupt_image])
def test_bad_data_is_one_line_exit_2(copy, tmp_path, capsys, breaker):
    expected = breaker(copy)
    code, lines = _run_main(capsys, ["train", "--data", f"melanoma:{copy}", "--out", str(tmp_path / "o"), *TINY])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])


def test_bad_options(melanoma, tmp_path, capsys):
    code, lines = _run_main(capsys, ["train", "--data", f"melanoma:{melanoma}", "--image-size", "50",
                                     "--out", str(tmp_path / "o")])
    assert code == 2 and lines == ["error: --image-size must be a multiple of 32 and at least 32 for attnvgg "
                                   "(five 2x downsamplings); got 50"]
    code, lines = _run_main(capsys, ["train", "--data", "imagenet:/x"])
    assert code == 2 and "expected synthetic" in lines[0]
    code, lines = _run_main(capsys, ["train", "--data", f"melanoma:{melanoma}", "--resume",
                                     "--out", str(tmp_path / "none")])
    assert code == 2 and "no checkpoint" in lines[0]
    code, lines = _run_main(capsys, ["predict", "--checkpoint", str(tmp_path / "missing.pt"),
                                     "--data", f"melanoma:{melanoma}"])
    assert code == 2 and lines[0].startswith("error: --checkpoint")


@pytest.mark.parametrize("option,value,expected", [
    ("--max-benign", "-1", "--max-benign must be 0 (keep all) or more; got -1"),
    ("--synthetic-n", "5", "--synthetic-n must be at least 20 for --data synthetic with --val-fraction 0.2"),
    ("--dropout", "1", "--dropout must be in [0, 1); got 1.0"),
    ("--dropout", "-0.1", "--dropout must be in [0, 1); got -0.1"),
    ("--workers", "-2", "--workers must be 0 or more; got -2"),
    ("--synthetic-size", "0", "--synthetic-size must be at least 32 pixels; got 0"),
])
def test_bad_numbers_are_one_line(tmp_path, capsys, option, value, expected):
    # rejected before any data is generated or read
    code, lines = _run_main(capsys, ["train", "--out", str(tmp_path / "o"), option, value])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: " + expected), lines
    assert not os.path.exists(tmp_path / "o")


def test_synthetic_minimum_is_enough_for_the_split(tmp_path):
    from attnfast.data import Preprocessing, build_datasets, ensure_synthetic, read_layout
    from attnfast.train.config import synthetic_min_n

    for kind, classes in (("melanoma", 2), ("cassava", 5)):
        n = synthetic_min_n("synthetic" if kind == "melanoma" else "synthetic-cassava", 0.2)
        info = read_layout(kind, ensure_synthetic(kind, n=n, size=32, root=str(tmp_path)))
        train_ds, val_ds = build_datasets(info, Preprocessing(image_size=32))
        for part in (train_ds, val_ds):
            assert len({s.label for s in part.samples}) == classes


def test_defaults_are_the_main_job_and_the_seeds():
    args = build_parser().parse_args(["train"])
    assert (args.data, args.model, args.attention, args.optimizer, args.lr) == \
        ("synthetic", "attnvgg", "fused", "adam", 1e-4)
    from attnfast.cli import train_config

    cfg = train_config(args).resolved()
    assert (cfg.image_size, cfg.width_mult, cfg.epochs) == (64, 0.125, 4)
    real = train_config(build_parser().parse_args(["train", "--data", "melanoma:/d"])).resolved()
    assert (real.image_size, real.batch_size, real.width_mult, real.max_benign) == (224, 100, 1.0, 6000)


def test_console_script_train_and_predict(melanoma, tmp_path):
    """Through the installed ``attnfast`` script: a run, a submission, and a corrupt-image error."""
    beside_python = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # venv not activated
    exe = shutil.which("attnfast", path=beside_python) or pytest.skip("attnfast console script not installed")
    out = str(tmp_path / "run")
    proc = subprocess.run([exe, "train", "--data", f"melanoma:{melanoma}", "--out", out, *TINY],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1 |" in proc.stdout and "attention localization" in proc.stdout
    sub = str(tmp_path / "submission.csv")
    proc = subprocess.run([exe, "predict", "--checkpoint", os.path.join(out, "best.pt"), "--data",
                           f"melanoma:{melanoma}", "--out", sub, "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(sub) as f:
        assert f.readline().strip() == "image_name,target" and len(f.readlines()) == 20
    broken = str(tmp_path / "broken")
    shutil.copytree(melanoma, broken)
    img = os.path.join(broken, "512x512-dataset-melanoma", "512x512-dataset-melanoma", "ISIC_0000002.jpg")
    with open(img, "wb") as f:
        f.write(b"\x89PNG truncated")
    proc = subprocess.run([exe, "predict", "--checkpoint", os.path.join(out, "best.pt"), "--data",
                           f"melanoma:{broken}", "--out", sub, "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "ISIC_0000002.jpg" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ the parser
def test_bare_attnfast_prints_help_and_does_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("attnfast.train.train", lambda *a, **k: pytest.fail("bare attnfast started a job"))
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: attnfast") and "train" in out and "predict" in out
    assert os.listdir(tmp_path) == []


def test_version(capsys):
    import attnfast

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"attnfast {attnfast.__version__}"


def _subparsers():
    import argparse

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("command", ["train", "predict"])
def test_every_option_has_help_and_no_none_default(command):
    p = _subparsers()[command]
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert options
    for a in options:
        assert a.help and len(a.help) > 10, a.option_strings
    text = p.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    for block in text.split("\n  --")[1:]:  # a help text that gives its default does not get a second one
        assert block.count("default") <= 1, block


def test_train_options_are_the_config_fields():
    import dataclasses

    from attnfast.train import TrainConfig
    from attnfast.train.config import option_name

    p = _subparsers()["train"]
    flags = {a.option_strings[0]: a.dest for a in p._actions if a.option_strings and a.dest != "help"}
    assert flags == {option_name(f.name): f.name for f in dataclasses.fields(TrainConfig)}
    assert option_name("normalize_attn") == "--sigmoid-attn" and option_name("progress") == "--no-progress"
    args = build_parser().parse_args(["train", "--sigmoid-attn", "--no-progress", "--max-benign", "5"])
    from attnfast.cli import train_config

    cfg = train_config(args)
    assert (cfg.normalize_attn, cfg.progress, cfg.max_benign) == (False, False, 5)
    assert train_config(build_parser().parse_args(["train"])) == TrainConfig()


def test_resume_without_out(capsys):
    code, lines = _run_main(capsys, ["train", "--resume"])
    assert code == 2 and lines == ["error: --resume needs --out: the folder of the run to continue"]


@pytest.mark.parametrize("argv,expected", [
    (["--device", "foo"], "--device must be auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda (the "
                          "current GPU) or cuda:N; got 'foo'"),
    (["--device", "meta"], "--device must be auto"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more; got -1.0"),
    (["--momentum", "-1"], "--momentum must be in [0, 1); got -1.0"),
    (["--seed", "-1"], "--seed must be in 0..4294967295; got -1"),
    (["--split-seed", "4294967296"], "--split-seed must be in 0..4294967295; got 4294967296"),
    (["--lr", "nan"], "--lr must be a positive finite number; got nan"),
    (["--width-mult", "inf"], "--width-mult must be a positive finite number; got inf"),
    (["--overlay-count", "-1"], "--overlay-count must be 0 or more; got -1"),
])
def test_bad_option_values_are_one_line(tmp_path, capsys, argv, expected):
    code, lines = _run_main(capsys, ["train", "--out", str(tmp_path / "o"), *argv])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: " + expected), lines
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu(melanoma, tmp_path, capsys):
    code, lines = _run_main(capsys, ["train", "--data", f"melanoma:{melanoma}", "--out", str(tmp_path / "o"),
                                     "--device", "cuda", *TINY])
    assert code == 2 and lines == ["error: --device cuda: no CUDA GPU is visible to PyTorch "
                                   "(torch.cuda.is_available() is False); use --device cpu"]


def test_device_cuda_gets_an_index():
    import torch

    from attnfast.train.build import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").index == torch.cuda.current_device()


@pytest.mark.parametrize("argv,expected", [
    (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
    (["--device", "meta"], "--device must be auto"),
])
def test_predict_bad_options(melanoma, tmp_path, capsys, argv, expected):
    code, lines = _run_main(capsys, ["predict", "--checkpoint", str(tmp_path / "x.pt"), "--data",
                                     f"melanoma:{melanoma}", "--out", str(tmp_path / "s.csv"), *argv])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: " + expected), lines
