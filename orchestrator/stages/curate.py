"""Retrieval-augmented transfer-set curation (Vemulapalli et al., ICML 2024, arXiv 2311.18237, Sec. 3.2):
the labeled target images are queries, their nearest pool images form the transfer set.

Ray- and faiss-index-free: it takes the search results (scores, ids) plus the candidates' embeddings, pixel
hashes and (optionally) the adapted teacher's pseudo-labels, and returns a :class:`Manifest` of pool ids.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np


class EmptyTransferSetError(ValueError):
    """Curation would produce no images (budget 0, no queries, nothing found); the message says which."""


def per_query_share(n_queries: int, k: int | None, budget: int | None) -> np.ndarray:
    """Images each query contributes: ``k`` each, or ``budget`` split evenly (the first ``budget % Q`` queries
    get one more), as the paper's fixed total budgets do. Returns (Q,) int64. Raises EmptyTransferSetError."""
    if n_queries <= 0:
        raise EmptyTransferSetError("retrieval has no queries: the task's labeled subset is empty "
                                    "(check labels.label_fraction / labels.per_class)")
    if (k or 0) <= 0 and (budget or 0) <= 0:
        raise EmptyTransferSetError("retrieval budget is 0: set transfer_set.retrieval.k or .budget > 0")
    if k:
        return np.full(n_queries, k, np.int64)
    share = np.full(n_queries, budget // n_queries, np.int64)
    share[: budget % n_queries] += 1
    return share


def search_depth(share: np.ndarray, oversample: float, pool_size: int) -> int:
    """Neighbours to search per query: the largest share times ``oversample`` (room for duplicates), capped by
    the pool size."""
    return int(min(pool_size, max(1, math.ceil(int(share.max()) * oversample))))


def near_duplicate_pairs(emb: np.ndarray, threshold: float) -> list[np.ndarray]:
    """For (C, D) float32 L2-normalised embeddings, the neighbours of each row with cosine > ``threshold``
    (itself excluded), by an exact faiss range search. Returns C arrays of row indices."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, np.float32))
    lims, _, nbrs = index.range_search(np.ascontiguousarray(emb, np.float32), float(threshold))
    return [nbrs[lims[i]:lims[i + 1]][nbrs[lims[i]:lims[i + 1]] != i] for i in range(len(emb))]


@dataclass
class Manifest:
    """A curated transfer set as pool ids (not copies).

    Columns (length N): ``id`` int64 pool ids, ``score`` float32 cosine to the query that chose it, ``query``
    int64 (the query's index in the task's train split; -1 for a random sample), ``rank`` int64 (its rank in
    that query's neighbours), ``pseudo_label`` int64 (-1 when not balanced). ``stats``: counts of candidates
    and of what was dropped (exact / near duplicates, class balance)."""

    id: np.ndarray
    score: np.ndarray
    query: np.ndarray
    rank: np.ndarray
    pseudo_label: np.ndarray
    stats: dict = field(default_factory=dict)
    key: np.ndarray | None = None  # (N,) str: each image's key inside its pool shard, when known

    def __len__(self) -> int:
        return len(self.id)

    def content_hash(self) -> str:
        """16-hex-digit SHA-256 of (id, query, rank): stable across re-runs of the same curation."""
        h = hashlib.sha256()
        for a in (self.id, self.query, self.rank):
            h.update(np.ascontiguousarray(a, np.int64).tobytes())
        return h.hexdigest()[:16]

    def to_table(self, keys: list[str] | None = None, shards: list[str] | None = None):
        """As a pyarrow Table (plus ``key``/``shard`` string columns when given; ``keys`` defaults to
        ``self.key``)."""
        import pyarrow as pa

        keys = keys if keys is not None else (None if self.key is None else list(self.key))

        cols = {"id": self.id, "score": self.score, "query": self.query, "rank": self.rank,
                "pseudo_label": self.pseudo_label}
        t = pa.table({k: pa.array(v) for k, v in cols.items()})
        for name, v in (("key", keys), ("shard", shards)):
            if v is not None:
                t = t.append_column(name, pa.array(v, pa.string()))
        return t

    @classmethod
    def from_table(cls, t) -> "Manifest":
        key = t.column("key").to_numpy(zero_copy_only=False) if "key" in t.column_names else None
        return cls(*(t.column(c).to_numpy() for c in ("id", "score", "query", "rank", "pseudo_label")), key=key)


def curate(scores: np.ndarray, ids: np.ndarray, query_ids: np.ndarray, share: np.ndarray, *,
           fill: bool, cand_ids: np.ndarray, cand_emb: np.ndarray, cand_sha1: np.ndarray,
           dedup_threshold: float = 0.98, pseudo_labels: np.ndarray | None = None,
           num_classes: int | None = None) -> Manifest:
    """Merge the queries' neighbour lists into one deduplicated (optionally class-balanced) manifest.

    The lists are walked rank by rank, query by query (round robin), so every query gets its share of its
    own nearest images. A candidate is taken unless already taken, a pixel-exact duplicate (same SHA-1) of a
    taken image, a near duplicate (cosine > ``dedup_threshold``) of one, or (balance) of a class whose share
    (total / num_classes) is full.

    Args:
        scores, ids: (Q, K) float32 / int64 search results, best first; id -1 = no result.
        query_ids: (Q,) int64. share: (Q,) int64 from :func:`per_query_share`.
        fill: False (``k`` mode): a query's share counts ranks walked, i.e. the union of its top-k minus
            duplicates. True (``budget`` mode): it counts images taken, walking deeper until the total budget
            ``share.sum()`` is met; what a query cannot fill (its list ran out) goes to the other queries'
            next neighbours, round robin.
        cand_ids: (C,) int64 unique candidate ids, with cand_emb (C, D) float32 and cand_sha1 (C,) str.
        pseudo_labels: (C,) int64 teacher argmax per candidate, to balance classes (None: no balance).

    Raises EmptyTransferSetError if nothing is selected.
    """
    pos = {int(c): i for i, c in enumerate(cand_ids)}
    near = near_duplicate_pairs(cand_emb, dedup_threshold) if dedup_threshold < 1 else None
    total = int(share.sum())
    cap = math.ceil(total / num_classes) if pseudo_labels is not None and num_classes else None
    class_count = np.zeros(num_classes or 1, np.int64)
    used = np.zeros(len(share), np.int64)
    taken = np.zeros(len(cand_ids), bool)
    rejected = np.zeros(len(cand_ids), bool)  # a rejection is final: taken images and class counts only grow
    sha_taken: set[str] = set()
    rows: list[tuple[int, float, int, int, int]] = []
    drops = {"exact_duplicates": 0, "near_duplicates": 0, "class_balance": 0}

    def consider(q: int, r: int) -> bool:
        c = int(ids[q, r])
        i = pos.get(c, -1) if c >= 0 else -1
        if i < 0 or taken[i] or rejected[i]:
            return False
        reason = ("exact_duplicates" if cand_sha1[i] in sha_taken else
                  "near_duplicates" if near is not None and taken[near[i]].any() else
                  "class_balance" if cap and class_count[pseudo_labels[i]] >= cap else None)
        if reason:
            drops[reason] += 1
            rejected[i] = True
            return False
        taken[i] = True
        sha_taken.add(cand_sha1[i])
        if cap:
            class_count[pseudo_labels[i]] += 1
        rows.append((c, float(scores[q, r]), int(query_ids[q]), r,
                     int(pseudo_labels[i]) if pseudo_labels is not None else -1))
        return True

    for r in range(ids.shape[1]):  # each query's own share, nearest first
        for q in range(ids.shape[0]):
            if used[q] < share[q] and len(rows) < total:
                got = consider(q, r)
                used[q] += 1 if (got or not fill) else 0
    if fill:  # budget left by queries whose lists ran out of non-duplicates: the others' next neighbours
        for r in range(ids.shape[1]):
            for q in range(ids.shape[0]):
                if len(rows) >= total:
                    break
                consider(q, r)
    if not rows:
        raise EmptyTransferSetError("retrieval selected no pool images (every neighbour was missing or a "
                                    "duplicate); check the pool and transfer_set.retrieval.dedup_threshold")
    cols = list(zip(*rows))
    return Manifest(np.asarray(cols[0], np.int64), np.asarray(cols[1], np.float32), np.asarray(cols[2], np.int64),
                    np.asarray(cols[3], np.int64), np.asarray(cols[4], np.int64),
                    {"candidates": len(cand_ids), "selected": len(rows), "requested": total, **drops})
