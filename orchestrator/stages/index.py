"""faiss kNN index over embedding shards (cosine similarity = inner product of L2-normalised vectors).

The steps follow autofaiss's recipe with plain faiss (autofaiss itself cannot be installed next to numpy 2):

1. :func:`plan_index` picks the index from the pool size ``n``, the dimension ``d`` and a memory budget for
   one loaded part: exact ``Flat`` below ``exact_below`` vectors, IVF-Flat when the raw vectors fit, IVF-PQ
   with an SQ8 re-ranking copy (or PQ alone) when they do not, and several parts searched one after another
   when even that does not fit;
2. :func:`build_index` trains once on a random sample drawn across the shards, fills the parts from the shards
   (one shard in memory at a time) and writes ``part-00000.faiss``... and ``index.json`` atomically;
3. ``orchestrator.stages.index_search.search_index`` loads the parts one at a time, searches each and merges
   the per-part top-k, so a pool larger than one machine's memory is searched part by part. A Ray adapter
   can run :func:`train_index` once, :func:`fill_part` per part and ``index_search.search_part`` on different
   nodes, and merge with ``index_search.merge_topk``.

``index_search.exact_search`` is the brute-force reference (tests, benchmark ground truth, small pools).
Ids are the pool's int64 ids (``embedding_io.pool_id``); -1 (score -inf) marks a missing result.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from orchestrator.stages.embedding_io import embedding_dim, read_embedding_shard

KINDS = ("flat", "ivf_flat", "hnsw", "ivf_pq")
FORMAT = "kt-faiss-index/1"
# Search defaults, measured on clustered 512-d data (benchmarks/retrieval.py, Gaussian mixture, 2 cores):
# each IVF query scans about NPROBE_SCAN_FRACTION of the pool: nprobe = nlist / 512, at least MIN_NPROBE.
# 1M vectors, IVF16384,Flat: nprobe 32 -> recall@10 0.988 at 17x exact's queries/s (64: 0.994, 8x);
# 200k, IVF2048,Flat: nprobe 8 -> 0.953, 16 -> 0.986.
NPROBE_SCAN_FRACTION = 1 / 512
MIN_NPROBE = 16
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128  # efSearch 128: recall@10 0.97 at 100k x 512-d
REFINE_K_FACTOR = 8  # IVF-PQ shortlists k * 8 candidates, re-ranked with the SQ8 copy; 1M x 512-d,
# IVF16384,PQ128x8np,Refine(SQ8), nprobe 32: recall@10 0.965 (nprobe 16: 0.946, 64: 0.970)
HNSW_QUANTIZER_ABOVE = 16_384  # nlist above this: HNSW32 coarse quantizer (autofaiss's IVF{n}_HNSW32)
TWO_LEVEL_ABOVE = 4_096  # nlist above this: two-level k-means (sqrt(nlist) coarse clusters, then split)
TRAIN_PER_LIST, PQ_MIN_TRAIN = 40, 256 * 40  # faiss wants >= 39 training points per centroid
MIN_PART_ROWS = 1_000


class IndexMismatchError(ValueError):
    """An index and its queries or embedder disagree (dimension, embedder key)."""


@dataclass
class IndexPlan:
    """What to build and how to search it.

    kind: "flat" | "ivf_flat" | "hnsw" | "ivf_pq"; factory: faiss ``index_factory`` string (inner product);
    nprobe: IVF lists probed per query; ef_search: HNSW efSearch (of the coarse quantizer for IVF kinds);
    rows_per_part: most vectors per part so one loaded part fits the budget; bytes_per_vector: index bytes
    per vector (codes + ids); train_size: training sample (vectors, 0 = no training); nlist: IVF lists;
    k_factor: re-ranking shortlist factor (IVF-PQ with refine); fixed_bytes: per-part bytes independent of
    the rows (coarse centroids, codebooks).
    """

    kind: str
    factory: str
    nprobe: int | None
    ef_search: int | None
    rows_per_part: int
    bytes_per_vector: float
    train_size: int
    nlist: int | None = None
    k_factor: int | None = None
    fixed_bytes: int = 0

    def part_bytes(self, rows: int) -> int:
        """Estimated memory (bytes) of one loaded part holding ``rows`` vectors."""
        return int(self.fixed_bytes + rows * self.bytes_per_vector)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IndexPlan:
        return cls(**d)


# ----------------------------------------------------------------------------------------------- planning

def ivf_nlist(n: int) -> int:
    """autofaiss's number of IVF lists for ``n`` vectors: 2^round(log2(4 sqrt n)) below 1M, 16,384 below
    10M, 65,536 below 300M, 131,072 above; never more than n / 39 (faiss's minimum training points per
    list)."""
    if n < 1_000_000:
        nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    elif n < 10_000_000:
        nlist = 16_384
    elif n < 300_000_000:
        nlist = 65_536
    else:
        nlist = 131_072
    return max(1, min(nlist, 2 ** int(math.log2(max(1, n // 39)))))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: nlist / 512 (about 0.2% of the pool scanned), at least 16, at most nlist."""
    return min(nlist, max(MIN_NPROBE, round(nlist * NPROBE_SCAN_FRACTION)))


def _ivf(n: int, d: int, codec: str, code_bytes: float, refine: bool = False) -> IndexPlan:
    """An IVF plan for ``n`` d-dim vectors, ``codec`` "Flat" | "PQ{m}x8np" storing code_bytes per vector."""
    nlist = ivf_nlist(n)
    hnsw_q = nlist > HNSW_QUANTIZER_ABOVE
    nprobe = default_nprobe(nlist)
    factory = f"IVF{nlist}{'_HNSW32' if hnsw_q else ''},{codec}{',Refine(SQ8)' if refine else ''}"
    fixed = nlist * (4 * d + 48 + (8 * 32 + 16 if hnsw_q else 0)) + (256 * 4 * d if codec != "Flat" else 0)
    bpv = code_bytes + 8 + (d + 8 if refine else 0)  # codes + IVF ids (+ SQ8 copy + IndexIDMap ids)
    train = min(n, max(TRAIN_PER_LIST * nlist, PQ_MIN_TRAIN if codec != "Flat" else 0))
    return IndexPlan("ivf_pq" if codec != "Flat" else "ivf_flat", factory, nprobe,
                     max(2 * nprobe, 64) if hnsw_q else None, n, float(bpv), train, nlist,
                     REFINE_K_FACTOR if refine else None, fixed)


def _pq_candidates(n: int, d: int) -> list[IndexPlan]:
    """IVF-PQ plans, best recall first: PQ(d/4)+SQ8 re-ranking, then PQ alone with m = d/2, d/4, ... >= 4
    ("np": no polysemous training, which only serves Hamming filtering and is slow)."""
    ms = [m for m in (d // 2, d // 4, d // 8, d // 16, d // 32, d // 64) if m >= 4 and d % m == 0]
    ms = list(dict.fromkeys(ms)) or [d]
    first = [_ivf(n, d, f"PQ{d // 4}x8np", d // 4, refine=True)] if d % 4 == 0 and d >= 16 else []
    return first + [_ivf(n, d, f"PQ{m}x8np", m) for m in ms]


def _base_plan(n: int, d: int, kind: str) -> IndexPlan:
    """The one-part plan of a forced kind (ivf_pq: its recall-first candidate)."""
    if kind == "flat":
        return IndexPlan("flat", "Flat", None, None, n, float(4 * d + 8), 0)
    if kind == "hnsw":
        return IndexPlan("hnsw", f"HNSW{HNSW_M},Flat", None, HNSW_EF_SEARCH, n,
                         float(4 * d + 8 + 2 * HNSW_M * 4 + 16), 0)
    if kind == "ivf_flat":
        return _ivf(n, d, "Flat", 4 * d)
    return _pq_candidates(n, d)[0]


def _split(plan: IndexPlan, n: int, budget: int) -> IndexPlan:
    """``plan`` with rows_per_part set so one part fits ``budget`` bytes; ValueError if the budget is too
    small."""
    rows = int((budget - plan.fixed_bytes) // plan.bytes_per_vector)
    need = min(n, MIN_PART_ROWS)
    if rows < need:
        raise ValueError(f"memory budget {budget} bytes is too small for a {plan.kind} index "
                         f"({plan.factory}): one part of {need} vectors needs {plan.part_bytes(need)} bytes; "
                         "raise the budget")
    return replace(plan, rows_per_part=min(rows, n))


def plan_index(n: int, d: int, memory_budget_bytes: int, kind: str = "auto",
               exact_below: int = 100_000) -> IndexPlan:
    """Pick the index for ``n`` vectors of dimension ``d`` (float32, L2-normalised) so that one loaded part
    needs at most ``memory_budget_bytes`` bytes.

    auto: ``Flat`` (exact) when n < exact_below; else IVF-Flat (nlist by :func:`ivf_nlist`) when the raw
    vectors fit; else the first IVF-PQ that fits (PQ(d/4)+SQ8 re-ranking, then PQ alone, m = d/2, d/4, ...);
    else the re-ranking IVF-PQ split into parts of ``rows_per_part`` vectors. HNSW is only used when forced
    (kind="hnsw"): on CPU it adds ~5k 512-d vectors/s/2 cores, and its parts share no training.
    A forced ``kind`` keeps that kind and splits it into parts when it does not fit.

    Raises:
        ValueError: n <= 0, d <= 0, unknown kind, or a budget that cannot hold one part of
            min(n, 1000) vectors.
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"cannot index n={n} vectors of dimension d={d}: both must be positive")
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; valid: auto, {', '.join(KINDS)}")
    if kind != "auto":
        return _split(_base_plan(n, d, kind), n, memory_budget_bytes)
    if n < exact_below:
        return _split(_base_plan(n, d, "flat"), n, memory_budget_bytes)
    for plan in [_base_plan(n, d, "ivf_flat"), *_pq_candidates(n, d)]:
        if plan.part_bytes(n) <= memory_budget_bytes:
            return plan
    return _split(_pq_candidates(n, d)[0], n, memory_budget_bytes)


# ----------------------------------------------------------------------------------------------- building

@contextmanager
def faiss_threads(num_threads: int | None = None):
    """Run faiss with ``num_threads`` OpenMP threads (else $OMP_NUM_THREADS, which Ray sets to a task's CPUs,
    else the cores this process may use), restoring the previous setting afterwards. Yields the number."""
    import faiss

    before = faiss.omp_get_max_threads()
    n = num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        faiss.omp_set_num_threads(before)


def shard_rows(shard_paths: list[Path]) -> list[int]:
    """Rows of each shard, from the parquet footers only."""
    import pyarrow.parquet as pq

    return [pq.read_metadata(p).num_rows for p in shard_paths]


def sample_vectors(shard_paths: list[Path], size: int, seed: int = 0) -> np.ndarray:
    """``size`` vectors drawn uniformly without replacement across shards, reading one shard at a time.
    Returns (size, D) float32."""
    rows = shard_rows(shard_paths)
    starts = np.cumsum([0, *rows])
    pick = np.sort(np.random.default_rng(seed).choice(starts[-1], size, replace=False))  # global row numbers
    out = []
    for i, p in enumerate(shard_paths):
        local = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
        if len(local):
            out.append(read_embedding_shard(p)["embedding"][local])
    return np.concatenate(out)


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 10) -> np.ndarray:
    """Spherical k-means centroids (k, D) float32 of x (N, D) float32; two-level above TWO_LEVEL_ABOVE lists
    (sqrt(k) coarse clusters, each split into a share of k proportional to its size: ~sqrt(k)x faster)."""
    import faiss

    d = x.shape[1]
    if k <= TWO_LEVEL_ABOVE:
        km = faiss.Kmeans(d, k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=256)
        km.train(x)
        return km.centroids
    k1 = int(math.sqrt(k))
    top = faiss.Kmeans(d, k1, niter=niter, spherical=True, seed=seed, max_points_per_centroid=2000)
    top.train(x)
    assign = top.index.search(x, 1)[1].ravel()  # (N,) coarse cluster of each point
    order = np.argsort(assign, kind="stable")  # points grouped by coarse cluster
    bounds = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=k1))])
    share = np.diff(bounds * k // len(x))  # lists per coarse cluster, proportional to its size; sums to k
    cents = []
    for c in np.flatnonzero(share):
        sub = faiss.Kmeans(d, int(share[c]), niter=niter, spherical=True, seed=seed + 1 + int(c),
                           min_points_per_centroid=1, max_points_per_centroid=256)
        sub.train(x[order[bounds[c]:bounds[c + 1]]])
        cents.append(sub.centroids)
    return np.concatenate(cents)


def new_index(plan: IndexPlan, d: int):
    """An empty faiss index for ``plan``: IVF kinds keep their own ids; others are wrapped in IndexIDMap."""
    import faiss

    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        index = faiss.IndexIDMap(index)
    return index


def train_index(shard_paths: list[Path], plan: IndexPlan, seed: int = 0) -> bytes:
    """Train ``plan``'s index once on ``plan.train_size`` vectors sampled across the shards; returns the
    empty trained index serialised (bytes, small: centroids and codebooks), ready for :func:`fill_part`."""
    import faiss

    index = new_index(plan, embedding_dim(shard_paths[0]))
    if plan.train_size:
        x = sample_vectors(shard_paths, plan.train_size, seed)  # (train_size, D) float32
        ivf = faiss.extract_index_ivf(index)
        ivf.quantizer.add(kmeans(x, plan.nlist, seed))  # IVF skips its own k-means once nlist centroids exist
        index.train(x)  # PQ codebooks and the SQ8 ranges (IVF-Flat: nothing left to train)
    return faiss.serialize_index(index).tobytes()


def part_slices(rows: list[int], rows_per_part: int) -> list[list[tuple[int, int, int]]]:
    """Cut consecutive shards into parts of at most rows_per_part rows: per part, (shard, start, stop) slices
    (a shard larger than a part is cut across parts)."""
    parts, cur, filled = [], [], 0
    for s, r in enumerate(rows):
        start = 0
        while start < r:
            take = min(r - start, rows_per_part - filled)
            cur.append((s, start, start + take))
            start, filled = start + take, filled + take
            if filled == rows_per_part:
                parts.append(cur)
                cur, filled = [], 0
    return parts + ([cur] if cur else [])


def fill_part(trained: bytes, shard_paths: list[Path], slices: list[tuple[int, int, int]], out: Path) -> int:
    """Add the rows ``slices`` = [(shard, start, stop)] of the shards to a copy of the trained index with
    their pool ids and write it to ``out``; one shard in memory at a time. Returns the rows added."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    for s, start, stop in slices:
        shard = read_embedding_shard(shard_paths[s])
        index.add_with_ids(shard["embedding"][start:stop], shard["id"][start:stop].astype(np.int64))
        del shard
    faiss.write_index(index, str(out))
    return int(index.ntotal)


def build_index(shard_paths: list[Path], plan: IndexPlan, out_dir: Path, meta: dict, seed: int = 0,
                num_threads: int | None = None) -> Path:
    """Build ``plan`` over the embedding shards into ``out_dir`` (``part-00000.faiss``..., ``index.json``).

    Trains once on a sample, then fills the parts one after another. Everything is written into a temporary
    directory beside ``out_dir`` and renamed into place at the end, so a failed or killed build leaves no
    ``out_dir`` (an existing one is replaced only once the new one is complete). ``meta`` (e.g. the embedder
    key) is stored verbatim and checked by ``index_search.search_index``'s ``expect``. Memory: the training sample,
    then one shard plus the part being filled. faiss runs with ``num_threads`` threads (see
    :func:`faiss_threads`; restored afterwards). Returns ``out_dir``.

    Raises:
        ValueError: no shards, or shards of different dimensions.
    """
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise ValueError("build_index needs at least one embedding shard")
    dims = {embedding_dim(p) for p in shard_paths}
    if len(dims) != 1:
        raise ValueError(f"embedding shards have different dimensions {sorted(dims)}; embed them all with "
                         "one model")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with faiss_threads(num_threads) as threads:
            info = _build_into(tmp, shard_paths, plan, meta, seed, threads, dims.pop())
        (tmp / "index.json").write_text(json.dumps(info, indent=1))
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _build_into(tmp: Path, shard_paths: list[Path], plan: IndexPlan, meta: dict, seed: int, threads: int,
                d: int) -> dict:
    """Train and fill every part into ``tmp``; returns the index.json content."""
    t0 = time.perf_counter()
    trained = train_index(shard_paths, plan, seed)
    t1 = time.perf_counter()
    rows = shard_rows(shard_paths)
    parts = []
    for i, slices in enumerate(part_slices(rows, plan.rows_per_part)):
        name = f"part-{i:05d}.faiss"
        parts.append({"file": name, "rows": fill_part(trained, shard_paths, slices, tmp / name),
                      "shards": sorted({shard_paths[s].name for s, _, _ in slices})})
    t2 = time.perf_counter()
    return {"format": FORMAT, "plan": plan.to_dict(), "n": int(sum(rows)), "d": d, "meta": meta,
            "parts": parts, "seed": seed, "threads": threads,
            "seconds": {"train": round(t1 - t0, 3), "add": round(t2 - t1, 3)}}


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, replacing an existing ``out_dir`` only after it is done."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
