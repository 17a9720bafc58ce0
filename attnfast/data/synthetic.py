"""Synthetic stand-ins for the seeds' Kaggle sets, written in the same layouts so the real loaders read them.

- Melanoma-like: skin-coloured background with a lesion and its mask. Malignant lesions are irregular
  (noisy radius, off-centre lobes) and multi-coloured (dark brown, black, red and blue-grey patches);
  benign ones are round and uniformly brown. Distractors that carry no label information: hairs, a
  ruler with ticks, vignetting, skin texture. Masks go to ``masks/<image_id>.png``.
- Cassava-like: five leaf classes (bacterial blight, brown streak, green mottle, mosaic, healthy),
  with ``label_num_to_disease_map.json``.

Layouts: ``marking`` (Kaggle merged melanoma), ``siim`` (SIIM-ISIC), ``cassava``, ``folder``.
Everything is a deterministic function of ``seed``; directories are written to a temporary name
and renamed into place, so an interrupted generation never leaves a half-written dataset.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .. import config
from .layouts import MELANOMA_MERGED_SUBDIRS

CASSAVA_NAMES = {
    "0": "Cassava Bacterial Blight (CBB)",
    "1": "Cassava Brown Streak Disease (CBSD)",
    "2": "Cassava Green Mottle (CGM)",
    "3": "Cassava Mosaic Disease (CMD)",
    "4": "Healthy",
}
LAYOUTS = ("marking", "siim", "cassava", "folder")
GENERATOR_VERSION = 1


def _blob_polygon(rng, cx, cy, radius, irregular: bool, n: int = 48):
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    if irregular:
        r = np.ones(n)
        for k in range(2, 7):  # a few random low-frequency harmonics: lobed, asymmetric outline
            r += rng.uniform(0.06, 0.16) * np.cos(k * angles + rng.uniform(0, 2 * math.pi))
        r += rng.normal(0, 0.05, n)
        r = np.clip(r, 0.45, 1.6)
        ecc = rng.uniform(0.7, 1.3)
    else:
        r = 1 + rng.normal(0, 0.01, n)
        ecc = rng.uniform(0.9, 1.1)
    xs = cx + radius * r * np.cos(angles) * ecc
    ys = cy + radius * r * np.sin(angles) / ecc
    return list(zip(xs.tolist(), ys.tolist()))


def _skin(rng, size):
    base = np.array([rng.uniform(200, 240), rng.uniform(150, 190), rng.uniform(130, 170)])
    noise = rng.normal(0, 6, (size, size, 1)) + rng.normal(0, 3, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    vignette = 1 - rng.uniform(0.2, 0.5) * (xx ** 2 + yy ** 2) * 2
    img = (base[None, None] + noise) * vignette[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _hairs(rng, draw, size, count):
    for _ in range(count):
        x, y = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * math.pi)
        pts = []
        for _ in range(8):
            pts.append((x, y))
            angle += rng.normal(0, 0.25)
            step = size * rng.uniform(0.05, 0.12)
            x, y = x + step * math.cos(angle), y + step * math.sin(angle)
        shade = int(rng.uniform(20, 60))
        draw.line(pts, fill=(shade, shade - 10 if shade > 10 else 0, 0), width=max(1, size // 96))


def _ruler(rng, draw, size):
    h = max(4, size // 12)
    y0 = rng.choice([int(size * 0.02), int(size * 0.98) - h])
    draw.rectangle([0, y0, size, y0 + h], fill=(235, 235, 225))
    step = max(3, size // 20)
    for i, x in enumerate(range(0, size, step)):
        tick = h if i % 5 == 0 else h // 2
        draw.line([(x, y0), (x, y0 + tick)], fill=(40, 40, 40), width=1)


def lesion_image(rng, size: int, malignant: bool):
    """One skin image and its lesion mask (``L`` mode, 255 inside the lesion)."""
    img = _skin(rng, size)
    radius = size * rng.uniform(0.14, 0.26)
    margin = radius * 1.5
    cx, cy = rng.uniform(margin, size - margin, 2)
    poly = _blob_polygon(rng, cx, cy, radius, irregular=malignant)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    lesion = Image.new("RGB", (size, size))
    ld = ImageDraw.Draw(lesion)
    brown = tuple(int(v) for v in rng.uniform([110, 60, 30], [150, 90, 60]))
    ld.rectangle([0, 0, size, size], fill=brown)
    if malignant:  # several differently coloured patches inside the lesion
        palette = [(40, 25, 20), (20, 15, 15), (170, 50, 50), (90, 100, 130), (70, 40, 25)]
        for _ in range(int(rng.integers(4, 8))):
            colour = palette[int(rng.integers(len(palette)))]
            px, py = cx + rng.normal(0, radius * 0.5), cy + rng.normal(0, radius * 0.5)
            ld.polygon(_blob_polygon(rng, px, py, radius * rng.uniform(0.25, 0.5), True, 16), fill=colour)
    lesion = lesion.filter(ImageFilter.GaussianBlur(radius=size / 160))
    soft = mask.filter(ImageFilter.GaussianBlur(radius=size / 128))
    img = Image.composite(lesion, img, soft)
    draw = ImageDraw.Draw(img)
    _hairs(rng, draw, size, int(rng.integers(0, 6)))
    if rng.random() < 0.3:
        _ruler(rng, draw, size)
    return img, mask


def leaf_image(rng, size: int, label: int):
    """A leaf on a soil background; ``label`` follows :data:`CASSAVA_NAMES`. Returns (image, leaf mask)."""
    soil = np.array([rng.uniform(90, 130), rng.uniform(70, 100), rng.uniform(40, 70)])
    arr = soil[None, None] + rng.normal(0, 10, (size, size, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    cx, cy = rng.uniform(size * 0.4, size * 0.6, 2)
    rx, ry = size * rng.uniform(0.25, 0.35), size * rng.uniform(0.15, 0.22)
    angle = rng.uniform(0, math.pi)
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    xs = cx + rx * np.cos(t) * math.cos(angle) - ry * np.sin(t) * math.sin(angle)
    ys = cy + rx * np.cos(t) * math.sin(angle) + ry * np.sin(t) * math.cos(angle)
    poly = list(zip(xs.tolist(), ys.tolist()))
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    leaf = Image.new("RGB", (size, size), tuple(int(v) for v in rng.uniform([40, 110, 30], [70, 150, 50])))
    d = ImageDraw.Draw(leaf)
    d.line([(xs[0], ys[0]), (xs[20], ys[20])], fill=(120, 170, 90), width=max(1, size // 64))  # midrib
    spots = int(rng.integers(6, 12))
    for _ in range(spots):
        px, py = cx + rng.normal(0, rx * 0.4), cy + rng.normal(0, ry * 0.4)
        r = size * rng.uniform(0.02, 0.05)
        if label == 0:  # bacterial blight: dark angular lesions
            d.polygon(_blob_polygon(rng, px, py, r, True, 6), fill=(60, 50, 20))
        elif label == 1:  # brown streak: elongated brown streaks
            d.line([(px - 3 * r, py), (px + 3 * r, py + rng.normal(0, r))], fill=(120, 80, 30),
                   width=max(1, int(r / 2)))
        elif label == 2:  # green mottle: pale green blotches
            d.ellipse([px - r, py - r, px + r, py + r], fill=(150, 200, 110))
        elif label == 3:  # mosaic: yellow patches
            d.polygon(_blob_polygon(rng, px, py, r * 1.3, True, 10), fill=(210, 200, 60))
    leaf = leaf.filter(ImageFilter.GaussianBlur(radius=size / 200))
    img = Image.composite(leaf, img, mask)
    return img, mask


def _save_jpeg(img, path):
    img.save(path, format="JPEG", quality=92)


def write_dataset(root: str, *, layout: str = "marking", n: int = 200, size: int = 128, seed: int = 0,
                  malignant_fraction: float = 0.3) -> str:
    """Write a synthetic dataset in ``layout`` under ``root`` (created; must not exist or be empty)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    mask_dir = os.path.join(root, "masks")
    os.makedirs(mask_dir, exist_ok=True)
    rows = []
    if layout == "cassava":
        img_dir = os.path.join(root, "train_images")
        os.makedirs(img_dir, exist_ok=True)
        for i in range(n):
            label = i % 5
            img, mask = leaf_image(rng, size, label)
            name = f"{1000000 + i}.jpg"
            _save_jpeg(img, os.path.join(img_dir, name))
            mask.save(os.path.join(mask_dir, f"{1000000 + i}.png"))
            rows.append((name, label))
        _write_csv(os.path.join(root, "train.csv"), ("image_id", "label"), rows)
        with open(os.path.join(root, "label_num_to_disease_map.json"), "w", encoding="utf-8") as f:
            json.dump(CASSAVA_NAMES, f, indent=1)
        return root
    labels = (rng.random(n) < malignant_fraction).astype(int)
    labels[:2] = (0, 1)  # both classes always present
    if layout == "marking":
        img_dir = os.path.join(root, MELANOMA_MERGED_SUBDIRS[0])
    elif layout == "siim":
        img_dir = os.path.join(root, "jpeg", "train")
    else:
        img_dir = None
    for i, label in enumerate(labels.tolist()):
        img, mask = lesion_image(rng, size, bool(label))
        image_id = f"ISIC_{i:07d}"
        if layout == "folder":
            cls_dir = os.path.join(root, ("benign", "malignant")[label])
            os.makedirs(cls_dir, exist_ok=True)
            _save_jpeg(img, os.path.join(cls_dir, image_id + ".jpg"))
        else:
            os.makedirs(img_dir, exist_ok=True)
            _save_jpeg(img, os.path.join(img_dir, image_id + ".jpg"))
        mask.save(os.path.join(mask_dir, image_id + ".png"))
        rows.append((image_id, label))
    if layout == "marking":
        _write_csv(os.path.join(root, "marking.csv"), ("image_id", "patient_id", "source", "target"),
                   [(i, f"IP_{k:05d}", "SYNTH", t) for k, (i, t) in enumerate(rows)])
    elif layout == "siim":
        _write_csv(os.path.join(root, "train.csv"), ("image_name", "patient_id", "sex", "target"),
                   [(i, f"IP_{k:05d}", "unknown", t) for k, (i, t) in enumerate(rows)])
    return root


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def ensure_synthetic(kind: str = "melanoma", *, n: int = 3000, size: int = 128, seed: int = 0,
                     root: str | None = None) -> str:
    """Generate the synthetic set once into a cache folder keyed by its parameters; return its path."""
    layout = "cassava" if kind == "cassava" else "marking"
    key = hashlib.sha1(f"{GENERATOR_VERSION}-{layout}-{n}-{size}-{seed}".encode()).hexdigest()[:10]
    final = os.path.join(root or os.path.join(config.cache_dir(), "synthetic"), f"{kind}-{n}-{size}px-{key}")
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write_dataset(tmp, layout=layout, n=n, size=size, seed=seed)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not os.path.isdir(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
