import gzip
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import DatasetConfig
from orchestrator.data import DataError, SplitError, load_task_data, make_split
from orchestrator.data.loaders import read_idx


def test_fashion_mnist_idx_real_files(fmnist):
    assert fmnist.train.images.shape == (1000, 28, 28, 1) and fmnist.train.images.dtype == np.uint8
    assert fmnist.test.images.shape == (300, 28, 28, 1)
    assert np.bincount(fmnist.train.labels).tolist() == [100] * 10  # stratified limit
    assert fmnist.classes[0] == "T-shirt/top" and fmnist.num_classes == 10
    assert 0.2 < fmnist.pixel_stats()[0][0] < 0.4  # real clothing images, not noise


def test_truncated_idx_is_a_clear_error(tmp_path):
    p = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_missing_dataset_names_fix(tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.data.loaders.DEBIAN_FASHION_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("KT_FASHION_MNIST_DIR", raising=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*data.root.*data.download=true"):
        load_task_data(DatasetConfig(root=str(tmp_path / "empty")))


def write_folder(root, fmnist, per_class=3):
    for split, s in (("train", fmnist.train), ("test", fmnist.test)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(s.labels == c)[:per_class]):
                Image.fromarray(s.images[idx, ..., 0]).save(d / f"{i}.png")


def test_image_folder_loads_and_converts(tmp_path, fmnist):
    write_folder(tmp_path, fmnist)
    data = load_task_data(DatasetConfig(format="image_folder", root=str(tmp_path), channels=3, image_size=32))
    assert data.train.images.shape == (9, 32, 32, 3) and data.classes == ["class0", "class1", "class2"]
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    gray = load_task_data(DatasetConfig(format="image_folder", root=str(tmp_path), channels=1))
    assert gray.test.images.shape == (9, 28, 28, 1)
    first = np.flatnonzero(fmnist.train.labels == 0)[0]
    np.testing.assert_array_equal(gray.train.images[0], fmnist.train.images[first])


def test_corrupt_image_names_the_file(tmp_path, fmnist):
    write_folder(tmp_path, fmnist)
    bad = tmp_path / "train" / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"corrupt or unreadable image .*broken.png.*delete or replace"):
        load_task_data(DatasetConfig(format="image_folder", root=str(tmp_path)))


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task_data(DatasetConfig(format="image_folder", root=str(tmp_path / "nope")))


def test_split_is_stratified_seeded_and_saved(tmp_path, fmnist):
    s = make_split(fmnist.train.labels, label_fraction=0.05, seed=3)
    assert np.bincount(fmnist.train.labels[s.labeled]).tolist() == [5] * 10
    assert len(np.intersect1d(s.labeled, s.unlabeled)) == 0 and len(s.labeled) + len(s.unlabeled) == 1000
    assert np.array_equal(s.labeled, make_split(fmnist.train.labels, 0.05, seed=3).labeled)
    assert not np.array_equal(s.labeled, make_split(fmnist.train.labels, 0.05, seed=4).labeled)
    saved = json.loads(s.save(tmp_path / "split.json").read_text())
    assert saved["labeled"] == s.labeled.tolist() and saved["seed"] == 3
    assert len(make_split(fmnist.train.labels, per_class=2).labeled) == 20


def folder_cfg(root, channels=1):
    return DatasetConfig(format="image_folder", root=str(root), channels=channels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_directory_is_an_error_naming_it(tmp_path, fmnist, split):
    write_folder(tmp_path, fmnist)
    d = tmp_path / split / "class1"
    for f in d.iterdir():
        f.unlink()
    (d / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"class directory .*{split}/class1 holds no image files .*class 'class1' "
                                        rf"would have no {split} images. Fix: add images or remove it"):
        load_task_data(folder_cfg(tmp_path))


def test_test_class_missing_from_train_is_an_error_naming_it(tmp_path, fmnist):
    write_folder(tmp_path, fmnist)
    (tmp_path / "test" / "class0").rename(tmp_path / "test" / "shirt")
    with pytest.raises(DataError, match=r"test has class directories \['shirt'\] that the train split does not "
                                        r"have .*Fix: add images for them under train/"):
        load_task_data(folder_cfg(tmp_path))


def test_train_class_missing_from_test_is_an_error_naming_it(tmp_path, fmnist):
    write_folder(tmp_path, fmnist)
    for f in (tmp_path / "test" / "class2").iterdir():
        f.unlink()
    (tmp_path / "test" / "class2").rmdir()
    with pytest.raises(DataError, match=r"test has no directory for train classes \['class2'\].*Fix: add"):
        load_task_data(folder_cfg(tmp_path))


def test_hidden_directories_are_not_classes(tmp_path, fmnist):
    write_folder(tmp_path, fmnist)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    assert load_task_data(folder_cfg(tmp_path)).classes == ["class0", "class1", "class2"]


def sparse_labels(fmnist):
    """Real labels with class 1 cut down to 3 images: (N,) int64."""
    y = fmnist.train.labels
    return y[(y != 1) | (np.cumsum(y == 1) <= 3)]


def test_too_few_images_for_per_class_names_class_counts_and_fix(fmnist):
    with pytest.raises(SplitError, match=r"class 'Trouser' \(index 1\) has 3 train images but the split takes 5 "
                                         r"of it. Fix: lower labels.per_class, or add images of that class"):
        make_split(sparse_labels(fmnist), per_class=5, classes=fmnist.classes)
    with pytest.raises(ValueError, match=r"class index 1 has 3 train images"):  # also a ValueError; no names
        make_split(sparse_labels(fmnist), per_class=5)
    assert len(make_split(sparse_labels(fmnist), per_class=3, classes=fmnist.classes).labeled) == 30


def test_too_few_images_for_per_class_plus_validation(fmnist):
    with pytest.raises(DataError, match=r"class 'Trouser' \(index 1\) has 3 train images but the split takes 4 "
                                        r"\(2 labeled \+ 2 validation\).*lower labels.per_class or "
                                        r"labels.val_per_class"):
        make_split(sparse_labels(fmnist), per_class=2, val_per_class=2, classes=fmnist.classes)
    with pytest.raises(SplitError, match=r"takes 4 \(1 labeled \+ 3 validation\).*lower labels.label_fraction"):
        make_split(sparse_labels(fmnist), label_fraction=0.01, val_per_class=3, classes=fmnist.classes)
    assert len(make_split(sparse_labels(fmnist), label_fraction=0.01, val_per_class=2).val) == 20  # 1 + 2 fit


def test_class_with_no_train_images_is_named_when_classes_are_given(fmnist):
    y = fmnist.train.labels[fmnist.train.labels != 9]
    with pytest.raises(SplitError, match=r"class 'Ankle boot' \(index 9\) has no train images"):
        make_split(y, label_fraction=0.05, classes=fmnist.classes)
    assert len(make_split(y, label_fraction=0.05).labeled) == 45  # without names: only the classes present


def save_png(path, array):
    Image.fromarray(array).save(path)
    return path


def one_image_folder(tmp_path, fmnist, write):
    """An image folder whose train/class0/ holds one file written by ``write(path)``; returns its config."""
    write_folder(tmp_path, fmnist, per_class=1)
    (tmp_path / "train" / "class0" / "0.png").unlink()
    write(tmp_path / "train" / "class0")
    return folder_cfg(tmp_path)


def test_16bit_png_is_scaled_to_8bit_not_clipped(tmp_path, fmnist):
    img = fmnist.train.images[np.flatnonzero(fmnist.train.labels == 0)[0], ..., 0]  # (28, 28) uint8
    cfg = one_image_folder(tmp_path, fmnist, lambda d: save_png(d / "a.png", img.astype(np.uint16) * 257))
    assert Image.open(tmp_path / "train" / "class0" / "a.png").mode == "I;16"
    np.testing.assert_array_equal(load_task_data(cfg).train.images[0, ..., 0], img)
    rgb = load_task_data(cfg.model_copy(update={"channels": 3})).train.images[0]
    np.testing.assert_array_equal(rgb, np.repeat(img[..., None], 3, axis=2))


def test_32bit_integer_tiff_within_16bit_range_is_scaled_else_an_error(tmp_path, fmnist):
    cfg = one_image_folder(tmp_path, fmnist, lambda d: Image.fromarray(np.full((28, 28), 65535, np.int32)).save(
        d / "a.tif"))
    assert load_task_data(cfg).train.images[0].max() == 255
    Image.fromarray(np.full((28, 28), 70000, np.int32)).save(tmp_path / "train" / "class0" / "a.tif")
    with pytest.raises(DataError, match=r"a.tif has 32-bit integer pixels \(mode I, range 70000..70000\).*"
                                        r"Fix: save it as an 8- or 16-bit PNG"):
        load_task_data(cfg)


def test_float_tiff_is_an_error_naming_the_file(tmp_path, fmnist):
    cfg = one_image_folder(tmp_path, fmnist, lambda d: Image.fromarray(np.full((28, 28), 0.5, np.float32)).save(
        d / "f.tif"))
    with pytest.raises(DataError, match=r"f.tif has 32-bit float pixels \(mode F\).*Fix: save it as an 8- or"):
        load_task_data(cfg)


def test_transparency_goes_onto_white_and_cmyk_palette_convert(tmp_path, fmnist):
    def write(d):
        rgba = np.zeros((28, 28, 4), np.uint8)
        rgba[10:18, 10:18] = (0, 0, 0, 255)  # an opaque black square on a transparent background
        Image.fromarray(rgba, "RGBA").save(d / "a.png")
        Image.new("CMYK", (28, 28), (0, 255, 0, 0)).save(d / "b.tif")
        Image.new("P", (28, 28), 0).save(d / "c.gif")

    data = load_task_data(one_image_folder(tmp_path, fmnist, write).model_copy(update={"channels": 3}))
    a, b = data.train.images[0], data.train.images[1]
    assert a[0, 0].tolist() == [255, 255, 255] and a[12, 12].tolist() == [0, 0, 0]
    assert b[0, 0].tolist() == [255, 0, 255] and data.train.labels[:3].tolist() == [0, 0, 0]


def png_with_size(path, w, h):
    """A PNG written by PIL whose header then claims ``w`` x ``h`` pixels (CRC fixed)."""
    save_png(path, np.zeros((4, 4), np.uint8))
    b = bytearray(path.read_bytes())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("w, h, message", [
    (0, 4, r"corrupt or unreadable image .*z.png: cannot identify image file.*Fix: delete or replace this file"),
    (20000, 5000, r"image .*z.png is 20000x5000 pixels, over the 67,108,864-pixel limit.*Fix: downscale or delete"),
    (100000, 100000, r"image .*z.png is too large to decode .*Fix: downscale or delete it"),
])
def test_zero_size_or_huge_image_is_an_error_naming_the_file(tmp_path, fmnist, w, h, message):
    cfg = one_image_folder(tmp_path, fmnist, lambda d: png_with_size(d / "z.png", w, h))
    with pytest.raises(DataError, match=message):
        load_task_data(cfg)
