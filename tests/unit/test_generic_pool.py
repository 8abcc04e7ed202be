"""The ``generic`` transfer-set source over a large sharded pool: uniform random ids, no embeddings, no Ray."""
import numpy as np
import pytest

from orchestrator.config import ConfigError, DatasetConfig, PoolConfig, TransferSetConfig, resolve_config
from orchestrator.data import make_split
from orchestrator.data.loaders import DataError
from orchestrator.transfer_sets.retrieval import fetch_images
from orchestrator.stages.embedding_io import split_id
from orchestrator.stages.pools import count_records, iter_records, list_shards, sample_pool_ids
from orchestrator.transfer_sets.base import TransferContext
from orchestrator.transfer_sets.pools import build_transfer_set
from tests.pools import mixed_pool_images, write_image_dir, write_parquet, write_webdataset

PER_SHARD = 50


@pytest.fixture(scope="module")
def pool_data(fmnist):
    """300 real Fashion-MNIST images (120, keys ``target-N``) mixed with 180 off-domain patterns."""
    return mixed_pool_images(fmnist.train.images[:120], 180, seed=0)


@pytest.fixture(scope="module")
def ctx(fmnist):
    return TransferContext(fmnist, make_split(fmnist.train.labels, per_class=10))


def _cfg(root, **kw) -> TransferSetConfig:
    return TransferSetConfig(source="generic", pool={"format": "webdataset", "root": str(root),
                                                     "target_domain_prefix": "target-"}, **kw)


def test_generic_pool_draws_a_seeded_uniform_sample(tmp_path, ctx, pool_data):
    images, keys = pool_data
    write_webdataset(tmp_path, images, keys, PER_SHARD)  # 6 shards
    cfg = _cfg(tmp_path, max_images=100, seed=0)
    ts = build_transfer_set(ctx, cfg)
    assert len(ts) == 100 and ts.images.shape == (100, 28, 28, 1) and ts.images.dtype == np.uint8
    assert ts.source == "generic" and ts.description == f"100 images drawn at random from pool {tmp_path}"
    assert ts.info["pool_images"] == 300.0 and ts.info["bad_images"] == 0.0
    assert ts.info["target_domain_fraction"] == pytest.approx(120 / 300, abs=0.15)

    ids = sample_pool_ids(cfg.pool, list_shards(cfg.pool), 100, 0)
    assert ids.dtype == np.int64 and len(np.unique(ids)) == 100 and np.all(np.diff(ids) > 0)
    shard, row = split_id(ids)
    assert len(np.unique(shard)) >= 4 and row.max() < PER_SHARD
    np.testing.assert_array_equal(ts.images, images[shard * PER_SHARD + row])  # exactly the drawn images
    domain = np.mean([keys[i].startswith("target-") for i in shard * PER_SHARD + row])
    assert ts.info["target_domain_fraction"] == pytest.approx(domain)

    again = build_transfer_set(ctx, cfg)
    np.testing.assert_array_equal(again.images, ts.images)
    assert again.key == ts.key
    other = build_transfer_set(ctx, _cfg(tmp_path, max_images=100, seed=1))
    assert other.key != ts.key
    assert not np.array_equal(sample_pool_ids(cfg.pool, list_shards(cfg.pool), 100, 1), ids)

    # the pool changes (a new shard): another key, even for the same seed and size
    write_webdataset(tmp_path / "more", images[:20], [f"more-{i}" for i in range(20)], PER_SHARD)
    (tmp_path / "more" / "00000.tar").rename(tmp_path / "00006.tar")
    grown = build_transfer_set(ctx, cfg)
    assert grown.info["pool_images"] == 320.0 and grown.key != ts.key


def test_generic_pool_default_is_the_whole_pool(tmp_path, ctx, pool_data):
    images, keys = pool_data
    write_webdataset(tmp_path, images, keys, PER_SHARD)
    ts = build_transfer_set(ctx, _cfg(tmp_path))
    assert len(ts) == 300 and ts.info["target_domain_fraction"] == pytest.approx(0.4)
    np.testing.assert_array_equal(ts.images, images)


def test_generic_pool_skips_corrupt_records(tmp_path, ctx, pool_data, caplog):
    images, keys = pool_data
    write_webdataset(tmp_path, images, keys, PER_SHARD, corrupt={7, 130})
    cfg = _cfg(tmp_path)
    shards = list_shards(cfg.pool)
    assert [count_records(s, cfg.pool) for s in shards] == [PER_SHARD] * 6  # corrupt records keep their row
    with caplog.at_level("WARNING", logger="orchestrator.transfer_sets.retrieval"):
        ts = build_transfer_set(ctx, cfg)
    assert len(ts) == 298 and ts.info["bad_images"] == 2.0 and ts.info["pool_images"] == 300.0
    assert "skipped 2 of 300 images" in caplog.text
    np.testing.assert_array_equal(ts.images, np.delete(images, [7, 130], axis=0))
    ids = sample_pool_ids(cfg.pool, shards, None, 0)
    with pytest.raises(DataError, match="2 manifest images can no longer be read"):
        fetch_images(ids, shards, cfg.pool, (28, 28), 1)  # retrieval's manifests stay strict
    kept, got_keys, _ = fetch_images(ids, shards, cfg.pool, (28, 28), 1, skip_unreadable=True, with_keys=True)
    assert len(kept) == 298 and got_keys == [k for i, k in enumerate(keys) if i not in (7, 130)]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "image_dir"])
def test_count_records_matches_iter_records(tmp_path, pool_data, fmt):
    images, keys = pool_data
    images, keys = images[:70], keys[:70]
    {"webdataset": lambda: write_webdataset(tmp_path, images, keys, 30),
     "parquet": lambda: write_parquet(tmp_path, images, keys, 30),
     "image_dir": lambda: write_image_dir(tmp_path, images, keys)}[fmt]()
    pool = PoolConfig(format=fmt, root=str(tmp_path), shard_size=30)
    shards = list_shards(pool)
    assert [count_records(s, pool) for s in shards] == [sum(1 for _ in iter_records(s, pool)) for s in shards]
    ids = sample_pool_ids(pool, shards, 25, 3)
    assert len(ids) == 25 and len(fetch_images(ids, shards, pool, (28, 28), 1)) == 25
    assert len(sample_pool_ids(pool, shards, 1000, 3)) == 70


def test_unreadable_shard_is_a_clear_error(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"not a tar at all" * 100)
    pool = PoolConfig(root=str(tmp_path))
    with pytest.raises(DataError, match=r"pool shard 00000.tar .* is unreadable .*fix or remove it"):
        count_records(list_shards(pool)[0], pool)


def test_pool_config_is_chosen_by_format():
    ts = resolve_config({"transfer_set": {"source": "generic", "pool": {"format": "torchvision", "name": "MNIST"}}})
    assert isinstance(ts.transfer_set.pool, DatasetConfig)
    ts = resolve_config({"transfer_set": {"source": "generic", "pool": {"format": "parquet", "root": "/p"}}})
    assert isinstance(ts.transfer_set.pool, PoolConfig) and ts.transfer_set.pool.image_column == "jpg"
    assert isinstance(resolve_config(ts).transfer_set.pool, PoolConfig)  # survives a dump/validate round trip
    assert isinstance(TransferSetConfig(pool={"root": "/d"}).pool, DatasetConfig)  # no format: as before
    with pytest.raises(ConfigError, match=r"transfer_set\.pool: .*'laion'.*'fashion_mnist_idx', 'mnist_csv', 'image_folder', "
                                          r"'torchvision', 'webdataset', 'parquet', 'image_dir'"):
        resolve_config({"transfer_set": {"source": "generic", "pool": {"format": "laion", "root": "/p"}}})
    with pytest.raises(ConfigError, match=r"transfer_set\.pool\.webdataset\.root: Field required"):
        resolve_config({"transfer_set": {"pool": {"format": "webdataset"}}})
