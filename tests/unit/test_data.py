import gzip
import json

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import DatasetConfig
from orchestrator.data import DataError, load_task_data, make_split
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
