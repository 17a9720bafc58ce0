"""Training paths the end-to-end tests do not take: ``--amp fp16`` with its GradScaler, ``--compile``, ``ran92``,
and data errors raised inside DataLoader worker processes."""
import copy
import csv
import math
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch

from attnfast.cli import main
from attnfast.data import write_dataset
from attnfast.train import TrainConfig, Trainer, compute_loss, predict, train
from attnfast.train.checkpoint import load_checkpoint

TINY = dict(epochs=1, batch_size=8, progress=False, workers=0, lr=1e-3, image_size=32, width_mult=0.125)
CLI_TINY = ["--image-size", "32", "--width-mult", "0.125", "--epochs", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def melanoma(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("paths") / "m"), layout="marking", n=20, size=40, seed=5)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ --amp fp16
def _fp16_trainer(melanoma, tmp_path, **kw):
    cfg = TrainConfig(data=f"melanoma:{melanoma}", out=str(tmp_path / "fp16"), amp="fp16", optimizer="sgd",
                      momentum=0.0, **dict(TINY, lr=0.1, **kw))
    return Trainer(cfg, log=lambda *_: None)


def test_fp16_grad_scaler_scales_unscales_skips_and_backs_off(melanoma, tmp_path):
    t = _fp16_trainer(melanoma, tmp_path)
    assert t.amp_dtype == torch.float16 and t.scaler.is_enabled()
    x, y = next(iter(t._train_loader(0)))
    params = [p for p in t.raw_model.parameters() if p.requires_grad]
    scale0 = t.scaler.get_scale()
    assert scale0 == 65536.0

    dtypes = []
    conv = next(m for m in t.raw_model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))

    # 1. an inf gradient: the step is skipped (no parameter moves) and the scale halves
    before = [p.detach().clone() for p in params]
    bad = params[0].register_hook(lambda g: torch.full_like(g, math.inf))
    loss = t.train_step(x, y)
    bad.remove()
    assert dtypes == [torch.float16]  # the forward ran under fp16 autocast
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert t.scaler.get_scale() == scale0 / 2

    # 2. a clean step: SGD moves by -lr * the *unscaled* gradient (the scale does not leak into the update)
    ref = copy.deepcopy(t.raw_model).train()
    with torch.autocast("cpu", dtype=torch.float16):
        logits = ref(x)[0]
    compute_loss(logits, y, "binary").backward()
    before = [p.detach().clone() for p in params]
    t.train_step(x, y)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    expected = torch.cat([(-0.1 * q.grad).flatten() for q in ref.parameters() if q.requires_grad])
    assert moved.abs().max() > 0
    assert (moved - expected).norm() <= 1e-2 * expected.norm(), ((moved - expected).norm(), expected.norm())
    assert t.scaler.get_scale() == scale0 / 2  # unchanged after a clean step (it grows after 2000 of them)
    hook.remove()


def test_fp16_run_through_the_cli_saves_and_resumes_the_scaler(melanoma, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    assert main(["train", "--data", f"melanoma:{melanoma}", "--out", out, "--amp", "fp16", *CLI_TINY]) == 0
    (row,) = _rows(os.path.join(out, "metrics.csv"))
    assert np.isfinite(float(row["train_loss"])) and np.isfinite(float(row["val_auc"]))
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    scale = ck["scaler"]["scale"]
    assert ck["config"]["amp"] == "fp16" and 0 < scale <= 65536.0
    # --resume restores the scale (a fresh scaler would start again at 65536 and skip steps to find it)
    seen = {}
    real_restore = Trainer._restore

    def spy(self, state):
        real_restore(self, state)
        seen["scale"] = self.scaler.get_scale()
    monkeypatch.setattr(Trainer, "_restore", spy)
    assert main(["train", "--data", f"melanoma:{melanoma}", "--out", out, "--amp", "fp16", "--resume",
                 *CLI_TINY, "--epochs", "2"]) == 0  # the later --epochs wins
    assert seen["scale"] == scale
    assert [int(r["epoch"]) for r in _rows(os.path.join(out, "metrics.csv"))] == [1, 2]


# ------------------------------------------------------------------------------------------------ --compile
def test_compile_traces_the_fused_ops_without_graph_breaks(melanoma, tmp_path, monkeypatch):
    """``--compile`` wraps the model in ``torch.compile``. Here the backend is ``aot_eager``: the same Dynamo
    capture and AOT-autograd trace of attnfast's custom ops (fake-tensor rules, autograd formulas) as the
    default inductor backend, without inductor's C++ code generation. On the 2-core CI machine inductor took
    79 CPU-s for this run (318 s wall under load), too slow for a suite CI runs twice."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=backend, **kw))
    torch._dynamo.reset()
    counters.clear()
    out = str(tmp_path / "run")
    summary = train(TrainConfig(data=f"melanoma:{melanoma}", out=out, compile=True, **TINY), log=lambda *_: None)
    assert np.isfinite(summary["final"]["val_auc"])
    assert graphs, "torch.compile never compiled the model"
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("attnfast.grid_attention" in t for t in targets), sorted(targets)  # the fused op is in the graph
    assert not counters["graph_break"], dict(counters["graph_break"])
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])  # saved unwrapped, loadable without compile
    assert predict(os.path.join(out, "best.pt"), f"melanoma:{melanoma}", str(tmp_path / "s.csv"),
                   progress=False) == 20
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ ran92
def test_ran92_trains(melanoma, tmp_path):
    out = str(tmp_path / "ran92")
    summary = train(TrainConfig(data=f"melanoma:{melanoma}", model="ran92", out=out,
                                **dict(TINY, image_size=64, width_mult=0.0625)), log=lambda *_: None)
    final = summary["final"]
    assert np.isfinite(final["train_loss"]) and np.isfinite(final["val_auc"])
    # Attention-92: 1-2-3 attention modules per stage, each one's soft mask scored for localization
    masks = sorted(k for k in final if k.startswith("loc_stage") and not k.endswith("malignant"))
    assert masks == ["loc_stage1_1", "loc_stage2_1", "loc_stage2_2", "loc_stage3_1", "loc_stage3_2",
                     "loc_stage3_3"], masks
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["meta"]["model"] == "ran92" and any(k.startswith("stage3.3.") for k in ck["model"])


# ------------------------------------------------------------------------------------------------ workers > 0
def _corrupt_every_image(root):
    folder = os.path.join(root, "512x512-dataset-melanoma", "512x512-dataset-melanoma")
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"GIF89a garbage")
    return "corrupt or unreadable image"


def _delete_after_listing(monkeypatch):
    """The files exist when the layout is read and disappear before the workers open them."""
    import attnfast.train.loop as engine

    real = engine.build_datasets

    def build_then_delete(*args, **kwargs):
        train_ds, val_ds = real(*args, **kwargs)
        for s in train_ds.samples:
            os.remove(s.path)
        return train_ds, val_ds
    monkeypatch.setattr(engine, "build_datasets", build_then_delete)
    return "image file not found"


@pytest.mark.parametrize("breaker", ["corrupt", "missing"])
def test_worker_data_errors_are_one_line(melanoma, tmp_path, monkeypatch, capfd, breaker):
    root = str(tmp_path / "data")
    shutil.copytree(melanoma, root)
    expected = _corrupt_every_image(root) if breaker == "corrupt" else _delete_after_listing(monkeypatch)
    workers = []
    real_loader = torch.utils.data.DataLoader.__iter__

    def spy(self):
        workers.append(self.num_workers)
        return real_loader(self)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", spy)
    code = main(["train", "--data", f"melanoma:{root}", "--out", str(tmp_path / "o"), "--workers", "2", *CLI_TINY])
    err = capfd.readouterr().err  # file-descriptor level: the worker processes' stderr is in here too
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and workers[:1] == [2]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert expected in lines[0] and "ISIC_00000" in lines[0] and ".jpg" in lines[0], lines[0]
    assert "Traceback" not in err and "DataLoader worker" not in lines[0]
    # the workers are stopped with the error, not at a later garbage collection (5 s per worker then)
    assert not multiprocessing.active_children()
