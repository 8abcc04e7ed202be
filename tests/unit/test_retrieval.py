"""Retrieval building blocks without Ray: pool readers, embedding shards, curation, bad input."""
import numpy as np
import pytest

from orchestrator.config import ConfigError, PoolConfig, resolve_config
from orchestrator.data.loaders import DataError
from orchestrator.transfer_sets.retrieval import check_bad, fetch_images
from orchestrator.stages.curate import EmptyTransferSetError, Manifest, curate, per_query_share
from orchestrator.stages.embed import ShardEmbedder, embed_images, load_embedder, shard_paths
from orchestrator.stages.embedding_io import pool_id, read_embedding_shard, split_id
from orchestrator.stages.pools import list_shards, pool_fingerprint, read_shard_images
from tests.pools import write_image_dir, write_parquet, write_webdataset


@pytest.fixture(scope="module")
def images(fmnist):
    return fmnist.train.images[:30]  # (30, 28, 28, 1) uint8, real images


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "image_dir"])
def test_pool_formats_read_the_same_images_with_stable_ids(tmp_path, images, fmt):
    keys = [f"img{i:03d}" for i in range(len(images))]
    root = tmp_path / fmt
    {"webdataset": lambda: write_webdataset(root, images, keys, 12),
     "parquet": lambda: write_parquet(root, images, keys, 12),
     "image_dir": lambda: write_image_dir(root, images, keys)}[fmt]()
    cfg = PoolConfig(format=fmt, root=str(root), shard_size=12)
    shards = list_shards(cfg)
    assert [s.index for s in shards] == [0, 1, 2]
    got_keys, got = [], []
    for s in shards:
        rows, k, imgs, bad = read_shard_images(s, cfg, (28, 28), 1)
        assert bad == 0 and rows == list(range(len(k)))
        got_keys += [x.removesuffix(".png") for x in k]
        got.append(imgs)
    assert got_keys == keys
    np.testing.assert_array_equal(np.concatenate(got), images)
    # fetching by id decodes exactly the named images, in the asked order
    ids = np.array([pool_id(2, 1), pool_id(0, 3), pool_id(1, 0)])
    np.testing.assert_array_equal(fetch_images(ids, shards, cfg, (28, 28), 1), images[[25, 3, 12]])
    assert pool_fingerprint(cfg, shards) == pool_fingerprint(cfg, list_shards(cfg))


def test_decode_resizes_and_converts_channels(tmp_path, images):
    write_webdataset(tmp_path, images[:4], list("abcd"), 4)
    cfg = PoolConfig(root=str(tmp_path))
    _, _, rgb, _ = read_shard_images(list_shards(cfg)[0], cfg, (16, 20), 3)
    assert rgb.shape == (4, 16, 20, 3) and rgb.dtype == np.uint8


def test_corrupt_image_skipped_and_counted_ids_stay_stable(tmp_path, images):
    write_webdataset(tmp_path, images[:10], [f"k{i}" for i in range(10)], 10, corrupt={3})
    cfg = PoolConfig(root=str(tmp_path))
    rows, keys, imgs, bad = read_shard_images(list_shards(cfg)[0], cfg, (28, 28), 1)
    assert bad == 1 and 3 not in rows and rows[3] == 4 and len(imgs) == 9
    np.testing.assert_array_equal(imgs[3], images[4])


def test_missing_or_empty_pool_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*make-demo-pool"):
        list_shards(PoolConfig(root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match=r"no webdataset data \(expected \*\.tar\)"):
        list_shards(PoolConfig(root=str(tmp_path)))


def test_bad_fraction_enforced():
    ok = [{"images": 99, "bad": 1, "error": ""}, {"images": 100, "bad": 0, "error": ""}]
    assert check_bad(ok, 0.01, "p")["bad_images"] == 1
    with pytest.raises(DataError, match="exceed max_bad_fraction=0.001"):
        check_bad(ok, 0.001, "p")
    with pytest.raises(DataError, match=r"1 unreadable shards \(50\.00%\).*00001.tar: ReadError"):
        check_bad([ok[0], {"images": 0, "bad": 0, "error": "00001.tar: ReadError: bad"}], 0.1, "p")


@pytest.fixture()
def embedder(tiny_teacher_ckpt):
    return f"checkpoint/{tiny_teacher_ckpt}"


def test_embedding_shards_round_trip_and_resume(tmp_path, images, embedder):
    write_webdataset(tmp_path / "pool", images, [f"k{i}" for i in range(30)], 16, corrupt={20})
    (tmp_path / "pool" / "00002.tar").write_bytes(b"\x00garbage" * 100)  # a third, unreadable shard
    cfg = PoolConfig(root=str(tmp_path / "pool"))
    shards = list_shards(cfg)
    out = tmp_path / "emb"
    emb = ShardEmbedder(embedder, {}, cfg.model_dump(), (28, 28), 1, str(out), "float32", batch_size=7)
    res = emb({"index": [s.index for s in shards], "name": [s.name for s in shards],
               "files": [s.files for s in shards], "bytes": [s.bytes for s in shards]})
    assert list(res["images"]) == [16, 13, 0] and list(res["bad"]) == [0, 1, 0]
    assert res["error"][2].startswith("00002.tar") and not shard_paths(out, 2)[0].exists()
    t = read_embedding_shard(shard_paths(out, 1)[0], ("id", "key", "sha1", "embedding"))
    shard, row = split_id(t["id"])
    assert set(shard) == {1} and 4 not in row and list(row[:5]) == [0, 1, 2, 3, 5]
    assert list(t["key"][:2]) == ["k16", "k17"]
    np.testing.assert_allclose(np.linalg.norm(t["embedding"], axis=1), 1.0, atol=1e-5)
    ref = embed_images(load_embedder(embedder), images[16:30][np.arange(14) != 4])
    np.testing.assert_allclose(t["embedding"], ref, atol=1e-5)
    before = shard_paths(out, 0)[0].stat().st_mtime_ns
    again = emb.embed_shard(shards[0])  # finished shards are not redone
    assert again["images"] == 16 and shard_paths(out, 0)[0].stat().st_mtime_ns == before


def _planted(n=40, d=16, seed=0):
    """Candidates with planted near duplicates: 10 -> 30 (cos ~0.999) and an exact pixel duplicate 11 = 12."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb[30] = emb[10] + 0.02 * rng.normal(size=d)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sha = np.array([f"h{i}" for i in range(n)], object)
    sha[12] = sha[11]
    return np.arange(n, dtype=np.int64) * 7, emb, sha


def test_dedup_removes_planted_near_and_exact_duplicates():
    cand, emb, sha = _planted()
    ids = cand[None, :]  # one query whose neighbours are all candidates, in order
    scores = np.linspace(1, 0, len(cand), dtype=np.float32)[None]
    m = curate(scores, ids, np.array([5]), np.array([40]), fill=True, cand_ids=cand, cand_emb=emb, cand_sha1=sha,
               dedup_threshold=0.98)
    assert cand[30] not in m.id and cand[12] not in m.id and cand[10] in m.id and cand[11] in m.id
    assert m.stats["near_duplicates"] == 1 and m.stats["exact_duplicates"] == 1 and len(m) == 38
    kept = emb[np.searchsorted(cand, m.id)]
    sims = kept @ kept.T - 2 * np.eye(len(kept))
    assert sims.max() <= 0.98
    m1 = curate(scores, ids, np.array([5]), np.array([40]), fill=True, cand_ids=cand, cand_emb=emb,
                cand_sha1=np.array([f"u{i}" for i in range(40)], object), dedup_threshold=1.0)
    assert len(m1) == 40  # threshold 1.0: near duplicates kept


def test_budget_split_over_queries_and_k_union():
    cand, emb, sha = _planted(seed=1)
    emb = np.eye(40, 40, dtype=np.float32)  # no near duplicates
    sha = np.array([f"u{i}" for i in range(40)], object)
    ids = np.stack([cand[:20], cand[10:30], cand[20:40]])  # overlapping neighbour lists
    scores = np.tile(np.linspace(1, 0.5, 20, dtype=np.float32), (3, 1))
    share = per_query_share(3, None, 25)
    assert list(share) == [9, 8, 8]
    m = curate(scores, ids, np.array([100, 101, 102]), share, fill=True, cand_ids=cand, cand_emb=emb,
               cand_sha1=sha, dedup_threshold=0.98)
    assert len(m) == 25 and len(set(m.id)) == 25
    assert {q: int((m.query == q).sum()) for q in (100, 101, 102)} == {100: 9, 101: 8, 102: 8}
    mk = curate(scores, ids, np.array([100, 101, 102]), per_query_share(3, 12, None), fill=False, cand_ids=cand,
                cand_emb=emb, cand_sha1=sha, dedup_threshold=0.98)
    expected = set(cand[:12]) | set(cand[10:22]) | set(cand[20:32])  # union of each query's top-12
    assert set(mk.id) == expected and len(mk) == len(expected)


def test_class_balance_caps_each_class():
    cand = np.arange(60, dtype=np.int64)
    emb, sha = np.eye(60, dtype=np.float32), np.array([str(i) for i in range(60)], object)
    labels = np.where(cand < 45, 0, np.where(cand < 52, 1, 2))  # class 0 dominates the nearest images
    m = curate(np.ones((1, 60), np.float32), cand[None], np.array([0]), np.array([30]), fill=True, cand_ids=cand,
               cand_emb=emb, cand_sha1=sha, pseudo_labels=labels, num_classes=3)
    counts = np.bincount(m.pseudo_label, minlength=3)
    assert counts[0] == 10 and counts[1] == 7 and counts[2] == 8 and m.stats["class_balance"] == 35


def test_manifest_hash_and_round_trip(tmp_path):
    cand, emb, sha = _planted()
    args = dict(fill=True, cand_ids=cand, cand_emb=emb, cand_sha1=sha)
    m = curate(np.ones((1, 40), np.float32), cand[None], np.array([1]), np.array([20]), **args)
    m2 = curate(np.ones((1, 40), np.float32), cand[None], np.array([1]), np.array([20]), **args)
    assert m.content_hash() == m2.content_hash()
    m3 = curate(np.ones((1, 40), np.float32), cand[None], np.array([1]), np.array([19]), **args)
    assert m3.content_hash() != m.content_hash()
    t = m.to_table([str(i) for i in m.id], ["s"] * len(m))
    back = Manifest.from_table(t)
    assert back.content_hash() == m.content_hash() and t.column("key").to_pylist()[0] == str(m.id[0])


def test_empty_results_are_clear_errors():
    with pytest.raises(EmptyTransferSetError, match="no queries"):
        per_query_share(0, 5, None)
    with pytest.raises(EmptyTransferSetError, match="budget is 0"):
        per_query_share(10, None, 0)
    with pytest.raises(EmptyTransferSetError, match="selected no pool images"):
        curate(np.ones((1, 2), np.float32), -np.ones((1, 2), np.int64), np.array([0]), np.array([2]), fill=True,
               cand_ids=np.zeros(0, np.int64), cand_emb=np.zeros((0, 4), np.float32),
               cand_sha1=np.zeros(0, object))
    with pytest.raises(ConfigError, match="transfer_set.retrieval.budget"):
        resolve_config({"transfer_set": {"source": "retrieval", "retrieval": {"pool": {"root": "x"}, "budget": 0}}})
    with pytest.raises(ConfigError, match="exactly one of k"):
        resolve_config({"transfer_set": {"retrieval": {"pool": {"root": "x"}, "k": 3, "budget": 9}}})
    with pytest.raises(ConfigError, match="unknown config key 'transfer_set.retrieval.pool.shards'"):
        resolve_config({"transfer_set": {"retrieval": {"pool": {"root": "x", "shards": 3}, "k": 3}}})


def test_transparent_pixels_composite_onto_white():
    import io

    from PIL import Image

    from orchestrator.stages.pools import decode_image

    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((0, 0), (0, 0, 0, 255))  # one opaque black pixel
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = decode_image(buf.getvalue(), (4, 4), 1)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255


def test_budget_a_query_cannot_fill_goes_to_the_others():
    cand = np.arange(15, dtype=np.int64)
    emb = np.eye(15, dtype=np.float32)
    emb[:5] = emb[0]  # query 0's five neighbours are one image, five times (near duplicates)
    sha = np.array([str(i) for i in range(15)], object)
    ids = np.stack([np.r_[cand[:5], [-1] * 5], cand[5:15]])
    m = curate(np.ones((2, 10), np.float32), ids, np.array([0, 1]), np.array([5, 5]), fill=True, cand_ids=cand,
               cand_emb=emb, cand_sha1=sha)
    assert len(m) == 10 and (m.query == 0).sum() == 1 and (m.query == 1).sum() == 9
    assert m.stats["near_duplicates"] == 4
