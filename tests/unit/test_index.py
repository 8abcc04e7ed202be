"""The faiss index stage on small clustered, L2-normalised data (seeded): planning, building, searching."""
import json
from dataclasses import replace

import numpy as np
import pytest

from orchestrator.stages import index as ix
from orchestrator.stages import index_search as ixs
from orchestrator.stages.embedding_io import pool_id, write_embedding_shard

D, SHARD_ROWS, SHARDS = 32, 1500, 4  # 6,000 vectors; shard indices 3, 5, 7, 9 give distinctive pool ids
META = {"embedder": "timm/vit_small:abc123", "note": ["kept", "verbatim"]}
CENTRES = np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)


def clustered(n: int, seed: int) -> np.ndarray:
    """(n, D) float32 unit vectors from a Gaussian mixture: one of 50 unit CENTRES plus noise of norm ~1."""
    rng = np.random.default_rng(seed)
    c = CENTRES / np.linalg.norm(CENTRES, axis=1, keepdims=True)
    x = c[rng.integers(0, len(c), n)] + rng.standard_normal((n, D)).astype(np.float32) / np.sqrt(D)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(ids, truth)]))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Embedding shards on disk and what was written: (paths, ids (N,) int64, vectors (N, D) float32)."""
    root = tmp_path_factory.mktemp("emb")
    x = clustered(SHARDS * SHARD_ROWS, seed=1)
    paths, ids = [], []
    for i in range(SHARDS):
        rows = np.arange(SHARD_ROWS)
        ids.append(pool_id(2 * i + 3, rows))
        paths.append(write_embedding_shard(root / f"emb-{i}.parquet", ids[-1], [str(r) for r in rows],
                                           [""] * SHARD_ROWS, x[i * SHARD_ROWS:(i + 1) * SHARD_ROWS]))
    return paths, np.concatenate(ids), x


@pytest.fixture(scope="module")
def queries():
    """(64, D) queries from the pool's mixture, not in the pool."""
    return clustered(64, seed=2)


@pytest.fixture(scope="module")
def truth(pool, queries):
    return ixs.exact_search(pool[0], queries, 10)


@pytest.fixture(scope="module")
def built(pool, tmp_path_factory):
    """build(kind, rows_per_part=None) -> (index_dir, plan), each built once per module (read-only use)."""
    cache = {}

    def build(kind: str, rows_per_part: int | None = None):
        if (kind, rows_per_part) not in cache:
            paths, ids, _ = pool
            plan = ix.plan_index(len(ids), D, 2**30, kind=kind)
            plan = replace(plan, rows_per_part=rows_per_part or plan.rows_per_part)
            out = tmp_path_factory.mktemp("index") / f"{kind}-{rows_per_part}"
            cache[kind, rows_per_part] = ix.build_index(paths, plan, out, META, seed=0, num_threads=1), plan
        return cache[kind, rows_per_part]

    return build


# ------------------------------------------------------------------------------- exactness, parts, ids

def test_exact_search_matches_numpy_brute_force(pool, queries, truth):
    _, ids, x = pool
    sims = queries @ x.T  # (Q, N)
    top = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(truth[1], ids[top])
    np.testing.assert_allclose(truth[0], np.take_along_axis(sims, top, 1), atol=1e-5)


def test_flat_index_equals_exact_search(built, queries, truth):
    out, plan = built("flat")
    assert plan.factory == "Flat"
    scores, ids = ixs.search_index(out, queries, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (64, 10)
    np.testing.assert_array_equal(ids, truth[1])
    np.testing.assert_allclose(scores, truth[0], atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)  # descending


def test_ivf_flat_probing_every_list_is_exact_and_default_nprobe_recalls(built, queries, truth):
    out, plan = built("ivf_flat")
    assert plan.kind == "ivf_flat" and plan.nlist == 128 and plan.factory == "IVF128,Flat"
    scores, ids = ixs.search_index(out, queries, 10, nprobe=plan.nlist)
    np.testing.assert_array_equal(ids, truth[1])
    np.testing.assert_allclose(scores, truth[0], atol=1e-5)
    few = ixs.search_index(out, queries, 10, nprobe=1)[1]
    assert recall(few, truth[1]) < recall(ixs.search_index(out, queries, 10)[1], truth[1])
    assert recall(ixs.search_index(out, queries, 10)[1], truth[1]) >= 0.95  # plan's default nprobe (16)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_several_parts_give_the_same_results_as_one(built, queries, kind):
    one, plan = built(kind)
    many, _ = built(kind, rows_per_part=1000)  # parts cut across 1,500-row shards
    info = ixs.load_index_info(many)
    assert len(ixs.load_index_info(one)["parts"]) == 1 and len(info["parts"]) == 6
    assert [p["rows"] for p in info["parts"]] == [1000] * 6 and info["n"] == 6000
    assert info["parts"][1]["shards"] == ["emb-0.parquet", "emb-1.parquet"]
    s1, i1 = ixs.search_index(one, queries, 10)
    s6, i6 = ixs.search_index(many, queries, 10)
    np.testing.assert_array_equal(i6, i1)
    np.testing.assert_allclose(s6, s1, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw", "ivf_pq"])
def test_ids_are_the_pool_ids_written_in_the_shards(pool, built, kind):
    paths, ids, x = pool
    out, _ = built(kind)
    rows = np.array([0, 1499, 1500, 3001, 5999])
    scores, got = ixs.search_index(out, x[rows], 5)  # each stored vector finds itself first
    np.testing.assert_array_equal(got[:, 0], ids[rows])
    assert set(got.ravel()) <= set(ids)
    assert got[0, 0] == pool_id(3, 0) and got[-1, 0] == pool_id(9, 1499)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=0.02 if kind == "ivf_pq" else 1e-5)


@pytest.mark.parametrize("kind,min_recall", [("hnsw", 0.95), ("ivf_pq", 0.8)])
def test_approximate_kinds_recall_against_exact(built, queries, truth, kind, min_recall):
    out, plan = built(kind)
    assert plan.kind == kind
    assert recall(ixs.search_index(out, queries, 10)[1], truth[1]) >= min_recall


def test_fewer_than_k_results_are_padded_with_minus_one(pool, tmp_path, queries):
    paths, ids, _ = pool
    plan = ix.plan_index(SHARD_ROWS, D, 2**30)
    out = ix.build_index(paths[:1], plan, tmp_path / "small", META, num_threads=1)
    scores, got = ixs.search_index(out, queries[:3], SHARD_ROWS + 5)
    assert np.all(got[:, :SHARD_ROWS] >= 0) and np.all(got[:, SHARD_ROWS:] == -1)
    assert np.all(np.isneginf(scores[:, SHARD_ROWS:]))
    assert sorted(got[0, :SHARD_ROWS]) == sorted(ids[:SHARD_ROWS])


def test_merge_topk_keeps_the_largest_scores():
    a = (np.array([[0.9, 0.1]], np.float32), np.array([[1, 2]], np.int64))
    b = (np.array([[0.5, 0.4]], np.float32), np.array([[3, 4]], np.int64))
    scores, ids = ixs.merge_topk([a, b], 3)
    np.testing.assert_array_equal(ids, [[1, 3, 4]])
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.4]])


# --------------------------------------------------------------------------------------- index.json, mismatch

def test_index_json_stores_plan_parts_and_meta_verbatim(built):
    out, plan = built("ivf_flat")
    info = ixs.load_index_info(out)
    assert info["meta"] == META and info["n"] == 6000 and info["d"] == D
    assert ix.IndexPlan.from_dict(info["plan"]) == plan == ix.IndexPlan.from_dict(plan.to_dict())
    assert json.loads((out / "index.json").read_text()) == info
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "part-00000.faiss"]


def test_dimension_mismatch_names_both_dimensions(pool, built):
    out, _ = built("flat")
    with pytest.raises(ix.IndexMismatchError, match=r"dimension 16 .*d=32.*rebuild the index"):
        ixs.search_index(out, np.zeros((2, 16), np.float32), 5)
    with pytest.raises(ix.IndexMismatchError, match="16"):
        ixs.exact_search(pool[0], np.zeros((2, 16), np.float32), 5)


def test_embedder_mismatch_names_both_embedders(built, queries):
    out, _ = built("flat")
    with pytest.raises(ix.IndexMismatchError) as e:
        ixs.search_index(out, queries, 5, expect={"embedder": "open_clip/ViT-B-32:laion2b"})
    assert "timm/vit_small:abc123" in str(e.value) and "open_clip/ViT-B-32:laion2b" in str(e.value)
    assert "rebuild" in str(e.value)
    assert ixs.search_index(out, queries, 5, expect={"embedder": META["embedder"]})[1].shape == (64, 5)
    assert issubclass(ix.IndexMismatchError, ValueError)


# --------------------------------------------------------------------------------------- atomic build

def test_failed_build_leaves_nothing_and_keeps_a_previous_index(pool, queries, tmp_path, monkeypatch):
    paths, _, _ = pool
    plan = replace(ix.plan_index(6000, D, 2**30, kind="ivf_flat"), rows_per_part=2000)
    real_fill, calls = ix.fill_part, []

    def failing_fill(*a):
        calls.append(a)
        if len(calls) == 2:
            raise RuntimeError("killed while filling part 2")
        return real_fill(*a)

    monkeypatch.setattr(ix, "fill_part", failing_fill)
    with pytest.raises(RuntimeError, match="part 2"):
        ix.build_index(paths, plan, tmp_path / "idx", META, num_threads=1)
    assert list(tmp_path.iterdir()) == []  # no out_dir, no temporary directory

    monkeypatch.setattr(ix, "fill_part", real_fill)
    good = ix.build_index(paths, plan, tmp_path / "idx", META, num_threads=1)
    before = ixs.search_index(good, queries, 10)
    calls.clear()
    monkeypatch.setattr(ix, "fill_part", failing_fill)
    with pytest.raises(RuntimeError):
        ix.build_index(paths, plan, tmp_path / "idx", {"embedder": "other"}, num_threads=1)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    assert ixs.load_index_info(good)["meta"] == META
    np.testing.assert_array_equal(ixs.search_index(good, queries, 10)[1], before[1])


def test_rebuild_replaces_an_existing_index_and_restores_faiss_threads(pool, tmp_path):
    import faiss

    paths, _, _ = pool
    plan = ix.plan_index(6000, D, 2**30)
    before = faiss.omp_get_max_threads()
    ix.build_index(paths, plan, tmp_path / "idx", {"embedder": "a"})
    ix.build_index(paths[:2], plan, tmp_path / "idx", {"embedder": "b"}, num_threads=1)
    info = ixs.load_index_info(tmp_path / "idx")
    assert info["meta"] == {"embedder": "b"} and info["n"] == 3000 and info["threads"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    assert faiss.omp_get_max_threads() == before


def test_missing_index_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_index"):
        ixs.search_index(tmp_path, np.zeros((1, D), np.float32), 1)


# --------------------------------------------------------------------------------------- planning

GiB = 2**30


def test_plan_small_pool_is_exact_flat():
    plan = ix.plan_index(50_000, 512, GiB)
    assert (plan.kind, plan.factory, plan.train_size, plan.rows_per_part) == ("flat", "Flat", 0, 50_000)


def test_plan_ivf_flat_when_raw_vectors_fit():
    plan = ix.plan_index(1_000_000, 512, 4 * GiB)
    assert plan.kind == "ivf_flat" and plan.factory == "IVF16384,Flat" and plan.rows_per_part == 1_000_000
    assert plan.nprobe == 32 and plan.train_size == 40 * 16_384
    assert plan.part_bytes(1_000_000) > 4 * 512 * 1_000_000  # raw vectors + ids + centroids
    assert ix.plan_index(500_000, 512, 4 * GiB).nlist == 2048  # 2^round(log2(4 sqrt n)) below 1M
    assert ix.plan_index(700_000, 512, 4 * GiB).nlist == 4096
    assert ix.plan_index(20_000_000, 512, 64 * GiB).factory == "IVF65536_HNSW32,Flat"
    assert ix.plan_index(2_000, 8, GiB, kind="ivf_flat").nlist == 32  # never more than n / 39 lists


def test_plan_hnsw_when_forced_and_it_fits():
    plan = ix.plan_index(1_000_000, 512, 4 * GiB, kind="hnsw")
    assert plan.kind == "hnsw" and plan.factory == "HNSW32,Flat" and plan.ef_search == 128
    assert plan.rows_per_part == 1_000_000


def test_plan_ivf_pq_when_raw_vectors_do_not_fit():
    refine = ix.plan_index(1_000_000, 512, GiB)  # raw: 2 GiB
    assert refine.kind == "ivf_pq" and refine.factory == "IVF16384,PQ128x8np,Refine(SQ8)"
    assert refine.k_factor == 8 and refine.part_bytes(1_000_000) <= GiB and refine.rows_per_part == 1_000_000
    small = ix.plan_index(1_000_000, 512, 128 * 2**20)
    assert small.kind == "ivf_pq" and "Refine" not in small.factory and small.rows_per_part == 1_000_000
    m = int(small.factory.split(",PQ")[1].split("x")[0])
    assert 512 % m == 0 and small.part_bytes(1_000_000) <= 128 * 2**20


def test_plan_splits_into_parts_when_even_pq_does_not_fit():
    budget = 256 * 2**20
    plan = ix.plan_index(10_000_000, 512, budget)
    assert plan.kind == "ivf_pq" and plan.rows_per_part < 10_000_000
    assert plan.part_bytes(plan.rows_per_part) <= budget < plan.part_bytes(plan.rows_per_part + 1)
    assert -(-10_000_000 // plan.rows_per_part) > 1  # several parts
    flat = ix.plan_index(50_000, 512, 20 * 2**20)  # 50k x 2 KiB = 100 MiB > 20 MiB: exact flat in parts
    assert flat.kind == "flat" and flat.rows_per_part == 20 * 2**20 // (4 * 512 + 8)


def test_plan_estimate_matches_the_built_part_size(built):
    for kind in ("flat", "ivf_flat"):
        out, plan = built(kind)
        size = (out / "part-00000.faiss").stat().st_size
        assert 0.9 < size / plan.part_bytes(6000) < 1.1, (kind, size, plan.part_bytes(6000))


@pytest.mark.parametrize("args,match", [
    ((0, 512, GiB), "n=0"), ((10, 0, GiB), "d=0"), ((10, 512, GiB, "annoy"), "unknown index kind 'annoy'"),
    ((10_000_000, 512, 10 * 2**20), "too small"), ((5000, 512, 1000), "too small"),
])
def test_plan_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ix.plan_index(*args)


def test_two_level_kmeans_gives_nlist_unit_centroids_and_a_working_index(pool, queries, truth, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(ix, "TWO_LEVEL_ABOVE", 16)  # as for nlist > 4096 on real pools
    _, _, x = pool
    cents = ix.kmeans(x, 100, seed=0)
    assert cents.shape == (100, D)
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
    plan = ix.plan_index(6000, D, 2**30, kind="ivf_flat")
    out = ix.build_index(pool[0], plan, tmp_path / "idx", META, num_threads=1)
    np.testing.assert_array_equal(ixs.search_index(out, queries, 10, nprobe=plan.nlist)[1], truth[1])
    assert recall(ixs.search_index(out, queries, 10)[1], truth[1]) >= 0.95
