"""``attnfast predict``: a trained checkpoint + a dataset -> a Kaggle submission CSV (written atomically)."""
from __future__ import annotations

import csv
import io
import os

import torch
from torch.utils.data import DataLoader

from ..data import (AttnfastDataError, ImageDataset, Preprocessing, eval_transform, list_images, parse_spec,
                    submission_id)
from .checkpoint import atomic_write, load_checkpoint
from .config import ConfigError
from .engine import build_from_checkpoint, load_data_info
from .progress import bar as progress_bar
from .visualize import split_output


def _load(checkpoint: str) -> dict:
    if not os.path.isfile(checkpoint):
        raise ConfigError(f"--checkpoint {checkpoint}: file not found")
    try:
        ck = load_checkpoint(checkpoint)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise ConfigError(f"--checkpoint {checkpoint}: not a readable attnfast checkpoint ({type(e).__name__})") \
            from None
    if not isinstance(ck, dict) or "meta" not in ck or "model" not in ck:
        raise ConfigError(f"--checkpoint {checkpoint}: not an attnfast checkpoint (no 'meta'/'model' entries)")
    return ck


def predict(checkpoint: str, data: str, out: str, *, attention: str | None = None, batch_size: int = 64,
            device: str = "auto", progress: bool = True) -> int:
    """Predict every image of ``data`` and write ``out``; returns the number of rows written.

    Binary models write ``image_name,target`` (the malignant probability, ``image_name`` without the file
    extension); multi-class ones ``image_id,label`` (the arg-max class, ``image_id`` the file name with its
    extension, e.g. ``2216849948.jpg``), as the Kaggle sample submissions of the melanoma and cassava
    competitions have them.
    """
    ck = _load(checkpoint)
    meta = ck["meta"]
    kind, path = parse_spec(data)
    info = list_images(path) if kind == "folder" else load_data_info(data, test=True)
    if not info.samples:
        raise AttnfastDataError(f"{info.source}: no images to predict")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model = build_from_checkpoint(meta, attention)
    model.load_state_dict(ck["model"])
    model.to(dev).eval()
    prep = Preprocessing(**{k: v for k, v in meta["preprocessing"].items() if k in Preprocessing.__dataclass_fields__})
    loader = DataLoader(ImageDataset(info.samples, eval_transform(prep)), batch_size=batch_size, shuffle=False)
    binary = meta["task"] == "binary"
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
    atomic_write(out, lambda f: f.write(buf.getvalue()), mode="w")
    return len(values)
