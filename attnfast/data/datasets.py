"""Datasets, the seeds' preprocessing (as configurable defaults) and the train/val split."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from .errors import AttnfastDataError
from .layouts import DatasetInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class Preprocessing:
    """The seeds' preprocessing; every field can be changed.

    ``max_per_class`` caps a class by random subsampling (the melanoma seed keeps 6000 benign and every
    malignant image: ``{0: 6000}``, the trainer's default for melanoma data); ``val_fraction``/``split_seed`` give the stratified 80/20 split
    (seed: ``train_test_split(test_size=0.2, random_state=1234)``); rotation/flip are the train
    augmentation; ``image_size`` the resize + center-crop side (224 in the seed, 512 native).
    """

    image_size: int = 224
    max_per_class: dict | None = None
    subsample_seed: int = 42
    val_fraction: float = 0.2
    split_seed: int = 1234
    rotation: float = 10.0
    hflip: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def train_transform(p: Preprocessing):
    ops = []
    if p.rotation:
        ops.append(T.RandomRotation(p.rotation))
    if p.hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.Resize(p.image_size), T.CenterCrop(p.image_size), T.ToTensor(), T.Normalize(p.mean, p.std)]
    return T.Compose(ops)


def eval_transform(p: Preprocessing):
    return T.Compose([T.Resize(p.image_size), T.CenterCrop(p.image_size), T.ToTensor(),
                      T.Normalize(p.mean, p.std)])


def mask_transform(p: Preprocessing):
    """Same geometry as :func:`eval_transform`, for lesion masks (values in [0, 1])."""
    return T.Compose([T.Resize(p.image_size), T.CenterCrop(p.image_size), T.ToTensor()])


HIGH_BIT_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """The image at ``path`` in PIL ``mode``; one :class:`AttnfastDataError` line for any file that cannot be read.

    Images with more than 8 bits per sample are scaled into the 8-bit range, never clipped: integer images
    (16-bit PNG/TIFF, PIL modes ``I;16*`` and ``I``) are read as 16-bit, value / 257 (65535 -> 255); float images
    (mode ``F``, e.g. a 32-bit float TIFF) are read as intensities in [0, 1], value * 255. An integer image with
    values outside 0..65535, or a float image with values outside [0, 1] (or NaN/inf), is refused: its scale is
    unknown. Images larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused.
    """
    try:
        with Image.open(path) as img:
            return _eight_bit(img, path).convert(mode)
    except FileNotFoundError:
        raise AttnfastDataError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise AttnfastDataError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise AttnfastDataError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None


def _eight_bit(img: Image.Image, path: str) -> Image.Image:
    """``img`` itself, or an 8-bit ``L`` image scaled from a 16-bit integer or a float one (see load_image)."""
    if img.mode in HIGH_BIT_INT_MODES:
        a = np.asarray(img).astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise AttnfastDataError(f"{path}: {img.mode} image with values {lo}..{hi}; attnfast reads integer "
                                    "images as 16-bit (0..65535); convert it to 8 or 16 bits")
        return Image.fromarray(np.rint(a / 257.0).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise AttnfastDataError(f"{path}: float image with values {np.nanmin(a):g}..{np.nanmax(a):g}; attnfast "
                                    "reads float images as intensities in [0, 1]; rescale it or save it as 8 or "
                                    "16 bits")
        return Image.fromarray(np.rint(a * 255.0).astype(np.uint8), "L")
    return img


class ImageDataset(Dataset):
    """``(image, label)`` or, with ``masks=True``, ``(image, label, mask)`` for each sample."""

    def __init__(self, samples, transform, *, masks: bool = False, mask_tf=None):
        self.samples = list(samples)
        self.transform = transform
        self.masks = masks
        self.mask_tf = mask_tf

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        s = self.samples[idx]
        img = self.transform(load_image(s.path))
        label = torch.tensor(s.label)
        if not self.masks:
            return img, label
        return img, label, self.mask_tf(load_image(s.mask, "L"))


def subsample(samples: list, max_per_class: dict | None, seed: int) -> list:
    """Keep at most ``max_per_class[c]`` random samples of class ``c`` (the seed's class balancing)."""
    if not max_per_class:
        return list(samples)
    rng = random.Random(seed)
    keep = []
    by_class = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    for label, idx in by_class.items():
        cap = max_per_class.get(label)
        if cap is not None and len(idx) > cap:
            idx = sorted(rng.sample(idx, cap))
        keep += idx
    return [samples[i] for i in sorted(keep)]


def stratified_split(info: DatasetInfo, val_fraction: float, seed: int):
    """Stratified train/val split with a fixed seed; errors name the data source."""
    from sklearn.model_selection import train_test_split

    samples = info.samples
    if not samples:
        raise AttnfastDataError(f"{info.source}: no samples left to split")
    if not 0 < val_fraction < 1:
        raise AttnfastDataError(f"validation fraction must be in (0, 1); got {val_fraction}")
    labels = [s.label for s in samples]
    counts = {c: labels.count(c) for c in set(labels)}
    if len(counts) < 2:
        raise AttnfastDataError(f"{info.source}: only one class ({next(iter(counts))}) present; "
                                "training needs at least two")
    small = {c: k for c, k in counts.items() if k < 2}
    if small:
        raise AttnfastDataError(f"{info.source}: class(es) {sorted(small)} have fewer than 2 images; "
                                "a stratified split needs 2 or more per class")
    try:
        train, val = train_test_split(samples, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError as e:
        raise AttnfastDataError(f"{info.source}: cannot split {len(samples)} images into train/val "
                                f"with fraction {val_fraction} ({e})") from None
    for name, part in (("train", train), ("validation", val)):
        if not part:
            raise AttnfastDataError(f"{info.source}: empty {name} split ({len(samples)} images, "
                                    f"val fraction {val_fraction})")
    return train, val


def build_datasets(info: DatasetInfo, p: Preprocessing):
    """``(train_ds, val_ds)`` with the seed's subsampling, stratified split and transforms."""
    info = dataclasses.replace(info, samples=subsample(info.samples, p.max_per_class, p.subsample_seed))
    train, val = stratified_split(info, p.val_fraction, p.split_seed)
    masks = info.has_masks
    train_ds = ImageDataset(train, train_transform(p))
    val_ds = ImageDataset(val, eval_transform(p), masks=masks, mask_tf=mask_transform(p) if masks else None)
    return train_ds, val_ds
