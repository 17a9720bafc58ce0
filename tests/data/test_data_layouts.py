"""attnfast.data: the Kaggle layouts (written by the synthetic generator), preprocessing, and bad data."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from attnfast.data import (AttnfastDataError, Preprocessing, build_datasets, ensure_synthetic, list_images,
                           load_image, parse_spec, read_layout, stratified_split, submission_id, subsample,
                           write_dataset)
from attnfast.data.errors import one_line
from attnfast.data.synthetic import lesion_image


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in ("marking", "siim", "cassava", "folder"):
        out[layout] = write_dataset(str(root / layout), layout=layout, n=30, size=48, seed=1)
    return out


def _copy(layouts, layout, tmp_path):
    dst = tmp_path / layout
    shutil.copytree(layouts[layout], dst)
    return str(dst)


def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize("layout,kind,source,task,ncls", [
    ("marking", "melanoma", "marking.csv", "binary", 2),
    ("siim", "melanoma", "train.csv", "binary", 2),
    ("cassava", "cassava", "train.csv", "multiclass", 5),
    ("folder", "folder", "", "binary", 2),
])
def test_layouts_read_back(layouts, layout, kind, source, task, ncls):
    info = read_layout(kind, layouts[layout])
    assert len(info.samples) == 30 and info.task == task and info.num_classes == ncls
    assert info.has_masks and all(os.path.isfile(s.path) and os.path.isfile(s.mask) for s in info.samples)
    assert info.source.endswith(source)
    if layout == "marking":
        assert "512x512-dataset-melanoma/512x512-dataset-melanoma" in info.samples[0].path
    if layout == "siim":
        assert os.path.join("jpeg", "train") in info.samples[0].path
    if layout == "cassava":
        assert info.class_names[3] == "Cassava Mosaic Disease (CMD)"
        assert sorted(set(info.labels)) == [0, 1, 2, 3, 4]
        assert info.samples[0].image_id.endswith(".jpg")  # Kaggle's cassava ids carry the extension
    if layout == "folder":
        assert info.class_names == ["benign", "malignant"]


def test_marking_flat_folder_is_found(layouts, tmp_path):
    root = _copy(layouts, "marking", tmp_path)
    nested = os.path.join(root, "512x512-dataset-melanoma", "512x512-dataset-melanoma")
    for name in os.listdir(nested):
        shutil.move(os.path.join(nested, name), root)
    shutil.rmtree(os.path.join(root, "512x512-dataset-melanoma"))
    info = read_layout("melanoma", root)
    assert len(info.samples) == 30 and os.path.dirname(info.samples[0].path) == root


def test_synthetic_labels_follow_the_lesion_shape():
    rng = np.random.default_rng(0)
    # malignant lesions are multi-coloured: more colour spread inside the mask than benign ones
    spread = {}
    for malignant in (False, True):
        vals = []
        for _ in range(6):
            img, mask = lesion_image(rng, 96, malignant)
            px = np.asarray(img, dtype=np.float32)[np.asarray(mask) > 200]
            vals.append(px.std(0).mean())
        spread[malignant] = np.mean(vals)
    assert spread[True] > 1.5 * spread[False]


def test_ensure_synthetic_generates_once(tmp_path):
    a = ensure_synthetic("melanoma", n=12, size=32, root=str(tmp_path))
    stamp = os.path.getmtime(os.path.join(a, "marking.csv"))
    b = ensure_synthetic("melanoma", n=12, size=32, root=str(tmp_path))
    assert a == b and os.path.getmtime(os.path.join(b, "marking.csv")) == stamp
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
    c = ensure_synthetic("cassava", n=10, size=32, root=str(tmp_path))
    assert read_layout("cassava", c).num_classes == 5


def test_subsample_and_stratified_split(layouts):
    info = read_layout("melanoma", layouts["marking"])
    n_mal = sum(info.labels)
    kept = subsample(info.samples, {0: 5}, seed=42)
    assert sum(s.label == 0 for s in kept) == 5 and sum(s.label for s in kept) == n_mal
    assert kept == subsample(info.samples, {0: 5}, seed=42)
    train, val = stratified_split(info, 0.2, 1234)
    assert len(val) == 6 and len(train) == 24 and not set(s.path for s in train) & set(s.path for s in val)
    ratio = sum(s.label for s in val) / len(val)
    assert abs(ratio - n_mal / 30) < 0.2
    assert [s.path for s in stratified_split(info, 0.2, 1234)[1]] == [s.path for s in val]


@pytest.mark.parametrize("size", [32, 512])
def test_transforms_any_size_and_masks_aligned(layouts, size):
    info = read_layout("melanoma", layouts["marking"])
    train_ds, val_ds = build_datasets(info, Preprocessing(image_size=size))
    x, y = train_ds[0]
    assert x.shape == (3, size, size) and y.dtype == torch.int64
    img, label, mask = val_ds[0]
    assert img.shape == (3, size, size) and mask.shape == (1, size, size)
    assert 0 < mask.mean() < 1
    # normalized with the ImageNet statistics: the skin background is far from 0..1 range
    assert img.min() < 0 < img.max()


def test_parse_spec():
    assert parse_spec("synthetic") == ("synthetic", None)
    assert parse_spec("cassava:/data/c") == ("cassava", "/data/c")
    with pytest.raises(AttnfastDataError, match="melanoma:DIR"):
        parse_spec("melanoma")
    with pytest.raises(AttnfastDataError, match="expected synthetic"):
        parse_spec("imagenet:/x")


# ---- bad data: one line, naming the file and the column ---------------------------------------------------
def _err(fn):
    with pytest.raises(AttnfastDataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_column(layouts, tmp_path):
    root = _copy(layouts, "marking", tmp_path)
    _rewrite_csv(os.path.join(root, "marking.csv"), lambda r: [[c.replace("target", "tgt") for c in r[0]]] + r[1:])
    msg = _err(lambda: read_layout("melanoma", root))
    assert "marking.csv" in msg and "'target'" in msg and "missing column" in msg


def test_missing_image(layouts, tmp_path):
    root = _copy(layouts, "siim", tmp_path)
    os.remove(os.path.join(root, "jpeg", "train", "ISIC_0000007.jpg"))
    msg = _err(lambda: read_layout("melanoma", root))
    assert "train.csv" in msg and "row 9" in msg and "ISIC_0000007" in msg and "not found" in msg


def test_corrupt_image(layouts, tmp_path):
    root = _copy(layouts, "marking", tmp_path)
    info = read_layout("melanoma", root)
    with open(info.samples[3].path, "wb") as f:
        f.write(b"\xff\xd8 this is not a jpeg")
    msg = _err(lambda: load_image(info.samples[3].path))
    assert info.samples[3].path in msg and "corrupt" in msg


@pytest.mark.parametrize("layout,kind,column,value", [
    ("marking", "melanoma", "target", "2"),
    ("cassava", "cassava", "label", "5"),
    ("cassava", "cassava", "label", "mosaic"),
])
def test_label_out_of_range(layouts, tmp_path, layout, kind, column, value):
    root = _copy(layouts, layout, tmp_path)
    name = "marking.csv" if layout == "marking" else "train.csv"
    def edit(rows):
        col = rows[0].index(column)
        rows[4][col] = value
        return rows
    _rewrite_csv(os.path.join(root, name), edit)
    msg = _err(lambda: read_layout(kind, root))
    assert name in msg and "row 5" in msg and repr(column) in msg


@pytest.mark.parametrize("layout,kind,edit,expected", [
    ("marking", "melanoma", lambda r: r[:3] + [r[3] + ["surplus"]] + r[4:], ("row 4", "5 cells", "4 columns")),
    ("marking", "melanoma", lambda r: r[:5] + [r[5][:3] + ["inf"]] + r[6:], ("row 6", "'target'", "'inf'")),
    ("cassava", "cassava", lambda r: r[:2] + [[r[2][0], "-inf"]] + r[3:], ("row 3", "'label'", "'-inf'")),
])
def test_surplus_cells_and_infinite_labels(layouts, tmp_path, layout, kind, edit, expected):
    root = _copy(layouts, layout, tmp_path)
    name = "marking.csv" if layout == "marking" else "train.csv"
    _rewrite_csv(os.path.join(root, name), edit)
    msg = _err(lambda: read_layout(kind, root))
    assert name in msg and all(piece in msg for piece in expected), msg


def test_submission_ids_follow_kaggle(layouts):
    assert submission_id("ISIC_0052060.jpg", "image_name") == "ISIC_0052060"  # melanoma: no extension
    assert submission_id("ISIC_0052060", "image_name") == "ISIC_0052060"
    assert submission_id("2216849948.jpg", "image_id") == "2216849948.jpg"  # cassava: with it
    assert submission_id("a.b", "image_name") == "a.b"  # only image extensions are dropped
    assert all(s.image_id.endswith(".jpg") for s in list_images(layouts["cassava"]).samples)


def test_bad_class_map(layouts, tmp_path):
    root = _copy(layouts, "cassava", tmp_path)
    with open(os.path.join(root, "label_num_to_disease_map.json"), "w") as f:
        json.dump({"0": "a", "2": "b"}, f)
    msg = _err(lambda: read_layout("cassava", root))
    assert "label_num_to_disease_map.json" in msg


@pytest.mark.parametrize("case", ["one_class", "too_few", "no_rows", "no_listing"])
def test_empty_split(layouts, tmp_path, case):
    root = _copy(layouts, "marking", tmp_path)
    path = os.path.join(root, "marking.csv")
    if case == "one_class":
        _rewrite_csv(path, lambda r: [r[0]] + [x for x in r[1:] if x[-1] == "0"])
    elif case == "too_few":
        _rewrite_csv(path, lambda r: [r[0]] + [x for x in r[1:] if x[-1] == "0"][:3] + [x for x in r[1:] if x[-1] == "1"][:1])
    elif case == "no_rows":
        _rewrite_csv(path, lambda r: [r[0]])
    else:
        os.remove(path)
    def run():
        info = read_layout("melanoma", root)
        build_datasets(info, Preprocessing(image_size=32))
    msg = _err(run)
    assert root in msg


def test_one_line_unwraps_a_worker_reraise():
    wrapped = AttnfastDataError("Caught AttnfastDataError in DataLoader worker process 0.\nOriginal Traceback "
                                "(most recent call last):\n  File x\nattnfast.data.errors.AttnfastDataError: "
                                "/d/a.jpg: corrupt or unreadable image")
    assert one_line(wrapped) == "/d/a.jpg: corrupt or unreadable image"


def test_list_images_for_predict(layouts):
    info = list_images(layouts["folder"])
    assert len(info.samples) == 30 and all("masks" not in s.path for s in info.samples)
