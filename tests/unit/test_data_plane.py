"""The streaming data plane without Ray: an ImageFolder ingested once into encoded-image shards, read lazily, and
a guard that fails when a stage decodes a whole large image set into one array."""
import tarfile

import numpy as np
import pytest

from orchestrator.config import DatasetConfig
from orchestrator.data import DataError, load_task_data
from orchestrator.data.decode import decode_image
from orchestrator.data.ingest import list_image_folder
from orchestrator.data.shards import (DECODE_LIMIT_ENV, ImageStore, MaterializationError, ShardedImages,
                                      open_images, save_images, take)
from tests.pools import write_mixed_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, fmnist):
    root = tmp_path_factory.mktemp("mixed")
    idx = np.concatenate([np.flatnonzero(fmnist.train.labels == c)[:16] for c in range(3)])
    counts = write_mixed_image_folder(root, fmnist.train.images[idx], fmnist.train.labels[idx], ["a", "b", "c"])
    return root, counts


def cfg(root, **kw):
    return DatasetConfig(format="image_folder", root=str(root), channels=3, image_size=32, **kw)


def test_mixed_modes_stream_from_shards_as_decoded_from_the_files(folder, tmp_path):
    root, counts = folder
    lazy = load_task_data(cfg(root, in_memory_max_mb=0), storage=tmp_path)
    assert lazy.train.lazy and lazy.test.lazy and lazy.classes == ["a", "b", "c"]
    assert (len(lazy.train), len(lazy.test)) == (counts["train"], counts["test"])
    assert lazy.train.images.shape[1:] == (32, 32, 3)
    listing = list_image_folder(root)
    assert listing.hidden == counts["hidden"]  # the '._*' copies are skipped, not read as corrupt images
    # every image decodes, from its shard member, to exactly what decoding the file gives
    rows = lazy.train.images.rows
    for k in (0, 5, len(rows) - 1):
        want = decode_image(root / listing.paths[rows[k]], 3, 32)
        np.testing.assert_array_equal(lazy.train.images[k], want)
    # small enough: the same pixels decoded into memory once (the size decision), same content key
    eager = load_task_data(cfg(root), storage=tmp_path)
    assert not eager.train.lazy
    np.testing.assert_array_equal(eager.train.images, lazy.train.images.materialize())
    np.testing.assert_array_equal(eager.train.labels, lazy.train.labels)
    assert np.allclose(eager.pixel_stats(), lazy.pixel_stats(), atol=1e-4)  # float32 sums vs float64
    # the shards are WebDataset-style tars of the files' own bytes
    store = ImageStore.open(lazy.train.images.location)
    with tarfile.open(next(p for p in (tmp_path / "cache" / "image_shards").rglob("shard-00000.tar"))) as t:
        first = t.getmembers()[0]
        assert t.extractfile(first).read() == (root / store.key[0]).read_bytes()


def test_second_load_reuses_the_shards_and_a_changed_file_re_ingests(folder, tmp_path, monkeypatch):
    root, _ = folder
    first = load_task_data(cfg(root, in_memory_max_mb=0), storage=tmp_path).train.images.location
    import orchestrator.data.ingest as ingest

    monkeypatch.setattr(ingest, "write_store", lambda *a, **k: pytest.fail("re-ingested an unchanged folder"))
    assert load_task_data(cfg(root, in_memory_max_mb=0), storage=tmp_path).train.images.location == first
    assert load_task_data(cfg(root, in_memory_max_mb=0, ingest="ray_data"), storage=tmp_path)  # same key


def test_every_unreadable_file_is_named_in_one_error(tmp_path, fmnist):
    root = tmp_path / "f"
    write_mixed_image_folder(root, fmnist.train.images[:12], np.arange(12) % 3, ["a", "b", "c"])
    bad = [root / "train" / "a" / "bad1.jpg", root / "train" / "b" / "bad2.png", root / "test" / "c" / "bad3.png"]
    for p in bad:
        p.write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        load_task_data(cfg(root), storage=tmp_path / "store")
    msg = str(e.value)
    assert msg.startswith(f"3 image files under {root} cannot be used")
    for p in bad:
        assert f"corrupt or unreadable image {p}" in msg  # each with today's wording
    assert not list((tmp_path / "store" / "cache" / "image_shards").glob("*/_COMPLETE"))  # nothing published


def test_mixed_sizes_without_image_size_keep_their_error(folder, tmp_path):
    root, _ = folder
    with pytest.raises(DataError, match=r"have different sizes .*set data.image_size"):
        load_task_data(DatasetConfig(format="image_folder", root=str(root)), storage=tmp_path)


def test_a_large_view_refuses_whole_set_decoding_but_decodes_batches(folder, tmp_path, monkeypatch):
    root, _ = folder
    images = load_task_data(cfg(root, in_memory_max_mb=0), storage=tmp_path).train.images
    per = 32 * 32 * 3
    monkeypatch.setenv(DECODE_LIMIT_ENV, str(10 * per))
    assert images[np.arange(4)].shape == (4, 32, 32, 3)  # a batch decodes
    with pytest.raises(MaterializationError, match="over the decode limit"):
        images[np.arange(20)]  # a request over the limit refuses to become one array ...
    big = take(images, np.arange(20))
    assert isinstance(big, ShardedImages)  # ... a subset stays a view ...
    with pytest.raises(MaterializationError):
        np.asarray(big)  # ... that cannot be turned into one array either
    with pytest.raises(MaterializationError):
        np.save(tmp_path / "old.npy", images)  # what a whole-array transfer-set entry used to do
    # a lazy set travels to other processes as a manifest of rows, never as pixels
    assert save_images(tmp_path, images).name == "images.json"
    back = open_images(tmp_path)
    assert isinstance(back, ShardedImages) and np.array_equal(back.rows, images.rows)
    np.testing.assert_array_equal(back[np.arange(3)], images[np.arange(3)])


def test_fixmatch_and_simclr_train_from_a_lazy_set_batch_by_batch(folder, tmp_path, monkeypatch):
    import torch

    from orchestrator.config import FixMatchConfig
    from orchestrator.models import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.stages.fixmatch import fixmatch_train
    from orchestrator.stages.pretrain import pretrain_simclr
    from tests.conftest import TINY_RESNET

    root, _ = folder
    task = load_task_data(cfg(root, in_memory_max_mb=0), storage=tmp_path)
    unlabeled = take(task.train.images, np.arange(8, len(task.train)))
    labeled = task.train.subset(np.arange(8))
    assert isinstance(unlabeled, ShardedImages)
    monkeypatch.setenv(DECODE_LIMIT_ENV, str(20 * 32 * 32 * 3))  # batches of 4 (+ 4 x mu) only
    pre = Preprocess(3, (32, 32), (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    student = create_student("timm/resnet10t", 3, pre, TINY_RESNET)
    _, flog = fixmatch_train(student, pre, labeled, unlabeled, FixMatchConfig(batch_size=4, mu=2), 3, 0)
    assert len(flog["loss"]) == 3 and np.isfinite(flog["loss"]).all()
    losses = pretrain_simclr(create_student("timm/resnet10t", 0, pre, TINY_RESNET), student.num_features, unlabeled,
                             pre, epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, temperature=0.2, proj_dim=16)
    assert len(losses) == 1 and np.isfinite(losses[0])


@pytest.mark.parametrize("workers", ["0", "1"])
def test_prefetched_batches_come_in_plan_order_on_a_thread_or_a_dataloader(folder, tmp_path, monkeypatch, workers):
    from orchestrator.stages.loop import prefetched

    root, _ = folder
    images = load_task_data(cfg(root, in_memory_max_mb=0), storage=tmp_path).train.images
    monkeypatch.setenv("KT_DECODE_WORKERS", workers)
    plan = [np.array([5, 1, 9]), np.array([0, 2]), np.array([7, 3, 4, 8])]
    got = list(prefetched(images, plan))
    assert [list(i) for i, _ in got] == [list(b) for b in plan]
    for idx, batch in got:
        np.testing.assert_array_equal(np.asarray(batch), images[idx])
