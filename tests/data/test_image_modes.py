"""Images are never silently blanked, a decompression bomb is one error line, an image listed twice is refused
(issue 14 items 3, 5)."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from attnfast.data import AttnfastDataError, listing_digest, load_image, read_layout, write_dataset


def _gradient(dtype, top):
    return (np.linspace(0, 1, 64 * 48).reshape(48, 64) * top).astype(dtype)


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    raw = _gradient(np.uint16, 65535)
    path = str(tmp_path / "deep.png")
    Image.fromarray(raw).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # Pillow reads it as a 16-bit (or 32-bit int) image
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    expected = np.rint(raw / 257.0).astype(np.uint8)
    assert (rgb[..., 0] == expected).all() and (rgb[..., 1] == expected).all()
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200  # not all 255 (the old convert)


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    raw = _gradient(np.float32, 1.0)
    path = str(tmp_path / "float.tif")
    Image.fromarray(raw, mode="F").save(path)
    rgb = np.asarray(load_image(path))
    assert (rgb[..., 2] == np.rint(raw.astype(np.float64) * 255).astype(np.uint8)).all()
    assert rgb.max() == 255 and len(np.unique(rgb)) > 200  # not all 0 (the old convert)
    assert np.asarray(load_image(path, "L")).max() == 255  # masks take the same path


@pytest.mark.parametrize("values,shown", [((0.0, 4000.0), "0..4000"), ((-1.0, 0.5), "-1..0.5"),
                                          ((0.0, float("nan")), "nan")])
def test_float_tiff_outside_unit_range_is_refused(tmp_path, values, shown):
    raw = np.full((8, 8), values[0], np.float32)
    raw[0, 0] = values[1]
    path = str(tmp_path / "hdr.tif")
    Image.fromarray(raw, mode="F").save(path)
    with pytest.raises(AttnfastDataError) as e:
        load_image(path)
    assert str(e.value).startswith(f"{path}: float image with values") and "[0, 1]" in str(e.value)
    if shown != "nan":
        assert shown in str(e.value)


def test_32_bit_int_image_beyond_16_bits_is_refused(tmp_path):
    path = str(tmp_path / "wide.tif")
    Image.fromarray(np.full((8, 8), 70000, np.int32), mode="I").save(path)
    with pytest.raises(AttnfastDataError, match="values 70000..70000; attnfast reads integer images as 16-bit"):
        load_image(path)


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.png")
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: Pillow raises
    with pytest.raises(AttnfastDataError) as e:
        load_image(path)
    assert str(e.value).startswith(f"{path}: refused as a possible decompression bomb")
    assert "\n" not in str(e.value)


def _rewrite(path, fn):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(fn(rows))


@pytest.mark.parametrize("suffix", ["", ".jpg"])  # the same file, by id and by file name
def test_image_listed_twice_is_refused(tmp_path, suffix):
    root = write_dataset(str(tmp_path / "m"), layout="marking", n=12, size=32, seed=1)
    listing = os.path.join(root, "marking.csv")
    _rewrite(listing, lambda r: r + [[r[3][0] + suffix] + r[3][1:]])
    with pytest.raises(AttnfastDataError) as e:
        read_layout("melanoma", root)
    assert str(e.value) == (f"{listing}: rows 4 and 14 both list image 'ISIC_0000002.jpg'; an image listed twice "
                            "can be trained on and validated on at once: remove the duplicate row")


def test_listing_digest_follows_ids_and_labels_not_order(tmp_path):
    root = write_dataset(str(tmp_path / "m"), layout="marking", n=12, size=32, seed=1)
    info = read_layout("melanoma", root)
    d = listing_digest(info.samples)
    assert d == listing_digest(list(reversed(info.samples)))
    relabelled = [info.samples[0].__class__(s.path, 1 - s.label, s.image_id) if i == 0 else s
                  for i, s in enumerate(info.samples)]
    assert listing_digest(relabelled) != d and listing_digest(info.samples[1:]) != d
