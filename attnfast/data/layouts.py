"""Readers for the dataset layouts the seeds use, producing a plain list of samples.

- ``melanoma``: the Kaggle merged set (``marking.csv`` with ``image_id,target,...``; images under
  ``512x512-dataset-melanoma/512x512-dataset-melanoma/`` or flat beside the CSV) or the SIIM-ISIC
  layout (``train.csv`` with ``image_name,target``; images under ``jpeg/train/``).
- ``cassava``: ``train.csv`` (``image_id,label``), ``train_images/`` and, for class names,
  ``label_num_to_disease_map.json``.
- ``folder``: a torchvision ImageFolder (``DIR/<class>/<image>``).

Every problem raises :class:`AttnfastDataError` with one line naming the file and column or row.
A ``masks/`` folder beside the CSV (written by the synthetic generator) is picked up as lesion masks.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os

from .errors import AttnfastDataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MELANOMA_MERGED_SUBDIRS = (
    os.path.join("512x512-dataset-melanoma", "512x512-dataset-melanoma"),
    "512x512-dataset-melanoma",
    "images",
    "",
)
SIIM_SUBDIRS = (os.path.join("jpeg", "train"), "train", "")
MELANOMA_CLASSES = ("benign", "malignant")


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str
    label: int
    image_id: str  # the id written to a submission
    mask: str | None = None


@dataclasses.dataclass
class DatasetInfo:
    """What a layout reader found: samples plus what the trainer and the submission need."""

    kind: str  # melanoma | cassava | folder
    root: str
    samples: list
    class_names: list
    task: str  # "binary" (one logit, focal loss) or "multiclass" (K logits, cross entropy)
    id_column: str  # submission header: image_name / image_id
    target_column: str  # submission header: target / label
    source: str = ""  # the CSV or folder the samples came from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> list:
        return [s.label for s in self.samples]

    @property
    def has_masks(self) -> bool:
        return bool(self.samples) and all(s.mask is not None for s in self.samples)


def _read_csv(path: str, required: tuple) -> list:
    if not os.path.isfile(path):
        raise AttnfastDataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise AttnfastDataError(
                    f"{path}: missing column {', '.join(repr(c) for c in missing)} "
                    f"(found columns: {', '.join(header) or 'none'})")
            rows = []
            for i, row in enumerate(reader, start=2):  # row numbers as a spreadsheet shows them
                if None in row:  # DictReader files surplus cells under the key None
                    raise AttnfastDataError(f"{path}: row {i}: {len(header) + len(row[None])} cells but the header "
                                            f"has {len(header)} columns")
                rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
    except UnicodeDecodeError as e:
        raise AttnfastDataError(f"{path}: not a UTF-8 CSV file ({e.reason})") from None
    except csv.Error as e:
        raise AttnfastDataError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise AttnfastDataError(f"{path}: no rows")
    return rows


def _int_label(value: str, path: str, column: str, row: int, allowed: range) -> int:
    try:
        number = float(value)
        label = int(number)
        if label != number:
            raise ValueError
    except (ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise AttnfastDataError(f"{path}: row {row}: column {column!r} must be an integer; got {value!r}") from None
    if label not in allowed:
        raise AttnfastDataError(f"{path}: row {row}: column {column!r} value {label} is out of range "
                                f"(expected {allowed.start}..{allowed.stop - 1})")
    return label


def _index_images(folder: str) -> dict:
    """file name and stem -> file name, for one folder (one directory scan instead of one stat per image)."""
    index = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return index
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in IMAGE_EXTS and entry.is_file():
            index.setdefault(entry.name, entry.name)
            index.setdefault(stem, entry.name)
    return index


def _pick_image_dir(root: str, subdirs: tuple, first_id: str) -> tuple:
    """``(folder, its index)``: the first of ``subdirs`` that holds ``first_id`` (each folder scanned once)."""
    for sub in subdirs:
        folder = os.path.join(root, sub)
        if os.path.isdir(folder):
            index = _index_images(folder)
            if first_id in index:
                return folder, index
    for sub in subdirs:  # none holds the first image: report against the most specific existing folder
        folder = os.path.join(root, sub)
        if os.path.isdir(folder) and sub:
            return folder, _index_images(folder)
    return root, _index_images(root)


def submission_id(image_id: str, id_column: str) -> str:
    """The id as Kaggle's sample submissions write it: melanoma's ``image_name`` without the file extension
    (``ISIC_0052060``), cassava's ``image_id`` with it (``2216849948.jpg``)."""
    stem, ext = os.path.splitext(image_id)
    return stem if id_column == "image_name" and ext.lower() in IMAGE_EXTS else image_id


def _resolve(index: dict, folder: str, image_id: str, csv_path: str, row: int) -> str:
    name = index.get(image_id)
    if name is None:
        raise AttnfastDataError(f"{csv_path}: row {row}: image {image_id!r} not found in {folder} "
                                f"(tried {image_id} with extensions {', '.join(IMAGE_EXTS[:3])}, ...)")
    return os.path.join(folder, name)


def _mask_for(mask_index: dict, mask_dir: str, image_id: str):
    stem = os.path.splitext(image_id)[0]
    name = mask_index.get(stem) or mask_index.get(image_id)
    return os.path.join(mask_dir, name) if name else None


def _csv_samples(root: str, csv_path: str, id_col: str, label_col: str, subdirs: tuple,
                 allowed: range, require_label: bool = True) -> list:
    rows = _read_csv(csv_path, (id_col, label_col) if require_label else (id_col,))
    image_dir, index = _pick_image_dir(root, subdirs, rows[0][id_col])
    mask_dir = os.path.join(root, "masks")
    mask_index = _index_images(mask_dir) if os.path.isdir(mask_dir) else {}
    samples = []
    first_row = {}  # image file -> the row that listed it first
    for i, row in enumerate(rows, start=2):  # row numbers as a spreadsheet shows them (header is row 1)
        image_id = row[id_col]
        if not image_id:
            raise AttnfastDataError(f"{csv_path}: row {i}: empty {id_col!r}")
        label = _int_label(row[label_col], csv_path, label_col, i, allowed) if require_label else -1
        path = _resolve(index, image_dir, image_id, csv_path, i)
        if path in first_row:  # refused, not deduplicated: the copies could land in train and validation
            raise AttnfastDataError(f"{csv_path}: rows {first_row[path]} and {i} both list image "
                                    f"{os.path.basename(path)!r}; an image listed twice can be trained on and "
                                    "validated on at once: remove the duplicate row")
        first_row[path] = i
        samples.append(Sample(path, label, image_id, _mask_for(mask_index, mask_dir, image_id)))
    return samples


def listing_digest(samples) -> str:
    """SHA-256 of the sorted ``(image id, label)`` pairs: what a train/validation split is made from. A
    resumed run compares it with the one recorded in its checkpoint."""
    h = hashlib.sha256()
    for image_id, label in sorted((s.image_id, s.label) for s in samples):
        h.update(f"{image_id}\t{label}\n".encode())
    return h.hexdigest()


def read_melanoma(root: str, *, test: bool = False) -> DatasetInfo:
    """Kaggle merged melanoma (marking.csv) or SIIM-ISIC (train.csv / test.csv with image_name)."""
    marking = os.path.join(root, "marking.csv")
    siim = os.path.join(root, "test.csv" if test else "train.csv")
    if test and os.path.isfile(siim):
        samples = _csv_samples(root, siim, "image_name", "target", (os.path.join("jpeg", "test"), "test", ""),
                               range(2), require_label=False)
        source, id_col = siim, "image_name"
    elif os.path.isfile(marking):
        samples = _csv_samples(root, marking, "image_id", "target", MELANOMA_MERGED_SUBDIRS, range(2))
        source, id_col = marking, "image_id"
    elif os.path.isfile(os.path.join(root, "train.csv")):
        source, id_col = os.path.join(root, "train.csv"), "image_name"
        samples = _csv_samples(root, source, "image_name", "target", SIIM_SUBDIRS, range(2))
    else:
        raise AttnfastDataError(f"{root}: no melanoma listing found (expected marking.csv with image_id,target "
                                "or train.csv with image_name,target)")
    # Kaggle's melanoma submissions are image_name,target whichever listing the images came from.
    return DatasetInfo("melanoma", root, samples, list(MELANOMA_CLASSES), "binary", "image_name", "target",
                       source)


def read_cassava(root: str, *, test: bool = False) -> DatasetInfo:
    """Kaggle cassava leaf disease: train.csv (image_id,label) + train_images/ + label_num_to_disease_map.json."""
    map_path = os.path.join(root, "label_num_to_disease_map.json")
    names = None
    if os.path.isfile(map_path):
        try:
            with open(map_path, encoding="utf-8") as f:
                raw = json.load(f)
            mapping = {int(k): str(v) for k, v in raw.items()}
        except (ValueError, AttributeError, TypeError) as e:
            raise AttnfastDataError(f"{map_path}: expected a JSON object {{\"0\": \"name\", ...}} ({e})") from None
        if sorted(mapping) != list(range(len(mapping))):
            raise AttnfastDataError(f"{map_path}: keys must be 0..{len(mapping) - 1}; got {sorted(mapping)}")
        names = [mapping[i] for i in range(len(mapping))]
    csv_path = os.path.join(root, "train.csv")
    if test:
        return _cassava_test(root, names)
    if names is None:  # no class map: the labels themselves define the classes
        rows = _read_csv(csv_path, ("image_id", "label"))
        top = max(_int_label(r["label"], csv_path, "label", i, range(10 ** 6)) for i, r in enumerate(rows, 2))
        names = [f"class {i}" for i in range(top + 1)]
    samples = _csv_samples(root, csv_path, "image_id", "label", ("train_images", ""), range(len(names)))
    return DatasetInfo("cassava", root, samples, names, "multiclass", "image_id", "label", csv_path)


def _cassava_test(root: str, names) -> DatasetInfo:
    folder = os.path.join(root, "test_images")
    sample_sub = os.path.join(root, "sample_submission.csv")
    if os.path.isdir(folder):
        if os.path.isfile(sample_sub):
            samples = _csv_samples(root, sample_sub, "image_id", "label", ("test_images",), range(10 ** 6),
                                   require_label=False)
        else:
            samples = [Sample(os.path.join(folder, n), -1, n) for n in sorted(os.listdir(folder))
                       if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
        if not samples:
            raise AttnfastDataError(f"{folder}: no images")
        return DatasetInfo("cassava", root, samples, names or [], "multiclass", "image_id", "label", folder)
    info = read_cassava(root)
    return info


def read_folder(root: str) -> DatasetInfo:
    """ImageFolder: one sub-folder per class (sorted names are the class indices)."""
    if not os.path.isdir(root):
        raise AttnfastDataError(f"{root}: folder not found")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if classes == ["masks"] or not classes:
        raise AttnfastDataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    mask_dir = os.path.join(root, "masks")
    has_mask_dir = "masks" in classes and len(classes) > 1
    if has_mask_dir:
        classes.remove("masks")
    mask_index = _index_images(mask_dir) if has_mask_dir else {}
    samples = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        for name in sorted(os.listdir(folder)):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:  # id: the file name (see submission_id)
                samples.append(Sample(os.path.join(folder, name), label, name, _mask_for(mask_index, mask_dir, name)))
    if not samples:
        raise AttnfastDataError(f"{root}: no images in the class folders {', '.join(classes)}")
    task = "binary" if len(classes) == 2 else "multiclass"
    id_col, target_col = ("image_name", "target") if task == "binary" else ("image_id", "label")
    return DatasetInfo("folder", root, samples, classes, task, id_col, target_col, root)


def list_images(root: str) -> DatasetInfo:
    """Every image under ``root`` (recursively), unlabeled: input for ``attnfast predict --data folder:DIR``."""
    if not os.path.isdir(root):
        raise AttnfastDataError(f"{root}: folder not found")
    samples = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "masks" and not d.startswith("."))
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                samples.append(Sample(os.path.join(dirpath, name), -1, name))  # id: the file name (submission_id)
    if not samples:
        raise AttnfastDataError(f"{root}: no images found")
    return DatasetInfo("folder", root, samples, [], "unknown", "image_id", "label", root)


def parse_spec(spec: str) -> tuple:
    """``'melanoma:DIR'`` -> ``('melanoma', 'DIR')``; ``'synthetic'`` / ``'synthetic-cassava'`` take no DIR."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("synthetic", "synthetic-melanoma", "synthetic-cassava"):
        return kind, path or None
    if kind not in ("melanoma", "cassava", "folder") or not sep or not path:
        raise AttnfastDataError(f"--data {spec!r}: expected synthetic, synthetic-cassava, melanoma:DIR, "
                                "cassava:DIR or folder:DIR")
    return kind, os.path.expanduser(path)


def read_layout(kind: str, root: str, *, test: bool = False) -> DatasetInfo:
    if kind == "melanoma":
        return read_melanoma(root, test=test)
    if kind == "cassava":
        return read_cassava(root, test=test)
    if kind == "folder":
        return read_folder(root)
    raise AttnfastDataError(f"unknown dataset kind {kind!r}")
