"""``attnfast predict``: a trained checkpoint + a dataset -> a Kaggle submission CSV (written atomically)."""
from __future__ import annotations

import csv
import io
import os

import torch
from torch.utils.data import DataLoader

from ..data import (AttnfastDataError, ImageDataset, Preprocessing, eval_transform, list_images, parse_spec,
                    submission_id)
from .build import build_from_checkpoint, load_data_info, load_weights, resolve_device
from .checkpoint import read_checkpoint, write_output
from .config import ConfigError
from .progress import bar as progress_bar
from .visualize import split_output


def _inputs(checkpoint: str, info) -> list:
    """Every file ``predict`` reads: the checkpoint, the listing and the images (the output must be none of them)."""
    paths = [checkpoint, info.source] + [p for s in info.samples for p in (s.path, s.mask)]
    return [p for p in paths if p and os.path.isfile(p)]


def _check_out(out: str, inputs: list) -> None:
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a folder; give the submission's file name (e.g. {out}/submission.csv)")
    if not os.path.exists(out):
        return
    for path in inputs:
        if os.path.samefile(out, path):
            raise ConfigError(f"--out {out} is an input of this prediction ({path}); attnfast does not overwrite "
                              "its inputs: choose another --out")


def predict(checkpoint: str, data: str, out: str, *, attention: str | None = None, batch_size: int = 64,
            device: str = "auto", progress: bool = True) -> int:
    """Predict every image of ``data`` and write ``out``; returns the number of rows written.

    Binary models write ``image_name,target`` (the malignant probability, ``image_name`` without the file
    extension); multi-class ones ``image_id,label`` (the arg-max class, ``image_id`` the file name with its
    extension, e.g. ``2216849948.jpg``), as the Kaggle sample submissions of the melanoma and cassava
    competitions have them. ``out`` may not be the checkpoint, the data's listing or one of its images.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1; got {batch_size}")
    if attention not in (None, "fused", "reference"):
        raise ConfigError(f"--attention must be fused or reference; got {attention!r}")
    dev = resolve_device(device)
    ck = read_checkpoint(checkpoint, "--checkpoint")
    meta = ck["meta"]
    kind, path = parse_spec(data)
    info = list_images(path) if kind == "folder" else load_data_info(data, test=True)
    if not info.samples:
        raise AttnfastDataError(f"{info.source}: no images to predict")
    _check_out(out, _inputs(checkpoint, info))
    try:
        model = build_from_checkpoint(meta, attention)
        prep = Preprocessing(**{k: v for k, v in meta["preprocessing"].items()
                                if k in Preprocessing.__dataclass_fields__})
        binary = meta["task"] == "binary"
    except (KeyError, TypeError, ValueError, ImportError) as e:
        raise ConfigError(f"--checkpoint {checkpoint}: its 'meta' entry does not describe a model "
                          f"({type(e).__name__}: {e})") from None
    load_weights(model, ck["model"], checkpoint, "--checkpoint")
    model.to(dev).eval()
    loader = DataLoader(ImageDataset(info.samples, eval_transform(prep)), batch_size=batch_size, shuffle=False)
    header = ("image_name", "target") if binary else ("image_id", "label")
    values = []
    with torch.no_grad():
        for x, _ in progress_bar(loader, "predict", enabled=progress):
            logits = split_output(model(x.to(dev)))[0].float()
            values += torch.sigmoid(logits.view(-1)).tolist() if binary else logits.argmax(1).tolist()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")  # as the Kaggle sample submissions
    w.writerow(header)
    for s, v in zip(info.samples, values):
        w.writerow((submission_id(s.image_id, header[0]), f"{v:.6f}" if binary else int(v)))
    write_output(out, lambda f: f.write(buf.getvalue()), mode="w", kept="no file was changed")
    return len(values)
