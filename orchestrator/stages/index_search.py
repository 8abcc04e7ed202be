"""Search of a built faiss index (orchestrator.stages.index builds it): the parts are loaded one at a time,
searched, and their per-part top-k merged (:func:`merge_topk`), so a pool larger than one machine's memory is
searched part by part; a Ray adapter can run :func:`search_part` on different nodes and merge the results.
:func:`exact_search` is the brute-force reference (tests, benchmark ground truth, small pools). Ids are the
pool's int64 ids (``embedding_io.pool_id``); -1 (score -inf) marks a missing result.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from orchestrator.stages.embedding_io import embedding_dim, read_embedding_shard
from orchestrator.stages.index import IndexMismatchError, IndexPlan

def load_index_info(index_dir: Path) -> dict:
    """index.json of a built index: format, plan (dict), n, d, meta, parts [{file, rows, shards}], seconds.

    Raises:
        FileNotFoundError: ``index_dir`` holds no finished index.
    """
    path = Path(index_dir) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"no finished faiss index at {index_dir} (index.json missing); "
                                "run build_index")
    return json.loads(path.read_text())


def _as_queries(queries: np.ndarray, d: int) -> np.ndarray:
    """(Q, D) float32 C-contiguous queries; IndexMismatchError if D != the index's d."""
    q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    if q.ndim != 2 or q.shape[1] != d:
        raise IndexMismatchError(f"queries have dimension {q.shape[-1]} but the index has d={d}: embed the "
                                 "queries with the embedder that built the index, or rebuild the index")
    return q


def check_meta(info: dict, expect: dict | None) -> None:
    """Raise IndexMismatchError when a key of ``expect`` (e.g. {"embedder": ...}) differs from the stored
    meta."""
    for key, want in (expect or {}).items():
        have = info.get("meta", {}).get(key)
        if have != want:
            raise IndexMismatchError(f"index {key} is {have!r} but {want!r} was expected: rebuild the index "
                                     f"with {want!r}, or query with the same {key} as the index ({have!r})")


def set_search_params(index, nprobe: int | None = None, ef_search: int | None = None,
                      k_factor: int | None = None) -> None:
    """Set nprobe (IVF), efSearch (HNSW, or an IVF's HNSW quantizer) and k_factor (refine) through the
    IndexIDMap / IndexRefine wrappers; None leaves a parameter unchanged."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return set_search_params(index.index, nprobe, ef_search, k_factor)
    if isinstance(index, faiss.IndexRefine):
        if k_factor:
            index.k_factor = k_factor
        return set_search_params(index.base_index, nprobe, ef_search, k_factor)
    if isinstance(index, faiss.IndexIVF):
        if nprobe:
            index.nprobe = nprobe
        return set_search_params(index.quantizer, None, ef_search, None)
    if isinstance(index, faiss.IndexHNSW) and ef_search:
        index.hnsw.efSearch = ef_search


def load_part(path: Path, plan: IndexPlan, nprobe: int | None = None, ef_search: int | None = None):
    """Read one part into memory (plain read_index: IO_FLAG_MMAP segfaults on search in faiss 1.15.1) and
    set its search parameters (``plan``'s defaults unless given)."""
    import faiss

    index = faiss.read_index(str(path))
    set_search_params(index, nprobe or plan.nprobe, ef_search or plan.ef_search, plan.k_factor)
    return index


def search_loaded(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search a loaded part: (scores (Q, k) float32 descending, ids (Q, k) int64; -1 and -inf if missing)."""
    scores, ids = index.search(queries, k)
    scores[ids < 0] = -np.inf
    return scores, ids


def search_part(path: Path, plan: IndexPlan, queries: np.ndarray, k: int, nprobe: int | None = None,
                ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one part, search it and free it: (scores (Q, k) float32, ids (Q, k) int64)."""
    return search_loaded(load_part(path, plan, nprobe, ef_search), queries, k)


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part results [(scores (Q, k_i) float32, ids (Q, k_i) int64)] into the overall top-k by
    inner product: (scores (Q, k) float32 descending, ids (Q, k) int64; -1 / -inf where fewer than k)."""
    import faiss

    heap = faiss.ResultHeap(len(results[0][0]), k, keep_max=True)
    for scores, ids in results:
        heap.add_result(np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(ids, np.int64))
    heap.finalize()
    scores, ids = heap.D, heap.I
    scores[ids < 0] = -np.inf
    return scores, ids


def search_parts(part_paths: list[Path], plan: IndexPlan, queries: np.ndarray, k: int,
                 nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search parts one after another (one in memory at a time) and merge: (scores (Q, k), ids (Q, k))."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return merge_topk([search_part(p, plan, queries, k, nprobe, ef_search) for p in part_paths], k)


def search_index(index_dir: Path, queries: np.ndarray, k: int, expect: dict | None = None,
                 nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """kNN search of a built index. queries: (Q, D) float32, L2-normalised like the pool.

    Returns (scores (Q, k) float32 inner products, descending; ids (Q, k) int64 pool ids, -1 with score -inf
    where the pool holds fewer than k). nprobe / ef_search override the plan's defaults.

    Raises:
        IndexMismatchError: D differs from the index's d, or ``expect`` disagrees with the stored meta.
        FileNotFoundError: no finished index in ``index_dir``.
    """
    info = load_index_info(index_dir)
    check_meta(info, expect)
    q = _as_queries(queries, info["d"])
    parts = [Path(index_dir) / p["file"] for p in info["parts"]]
    return search_parts(parts, IndexPlan.from_dict(info["plan"]), q, k, nprobe, ef_search)


def exact_search(shard_paths: list[Path], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k over the shards, one shard in memory at a time (IndexFlatIP per
    shard, merged): (scores (Q, k) float32 descending, ids (Q, k) int64 pool ids; -1 / -inf if fewer than k).

    Raises:
        IndexMismatchError: the queries' D differs from the shards'.
    """
    import faiss

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _as_queries(queries, embedding_dim(shard_paths[0]))
    results = []
    for p in shard_paths:
        shard = read_embedding_shard(p)
        flat = faiss.IndexFlatIP(q.shape[1])
        flat.add(shard["embedding"])
        scores, local = flat.search(q, k)  # (Q, k) float32, (Q, k) int64 row numbers
        results.append((scores, np.where(local >= 0, shard["id"][np.maximum(local, 0)], -1)))
    return merge_topk(results, k)
