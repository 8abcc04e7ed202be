"""Embedding shards on disk: one parquet file per pool shard, written atomically.

Columns: ``id`` int64 (stable pool id, see :func:`pool_id`), ``key`` string (the image's key inside its pool
shard), ``sha1`` string (hash of the decoded pixels, for exact-duplicate removal) and ``embedding``
fixed_size_list<float16|float32>[D] (L2-normalised image embeddings).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ID_SHARD_BITS = 32  # id = shard_index << 32 | row: 2^31 shards of up to 2^32 images each


def pool_id(shard_index: int, row: np.ndarray | int) -> np.ndarray:
    """Stable int64 pool ids: ``shard_index << 32 | row`` (row = position of the image inside its shard)."""
    return (np.int64(shard_index) << ID_SHARD_BITS) | np.asarray(row, np.int64)


def split_id(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pool_id`: (N,) int64 -> (shard_index (N,) int64, row (N,) int64)."""
    ids = np.asarray(ids, np.int64)
    return ids >> ID_SHARD_BITS, ids & ((1 << ID_SHARD_BITS) - 1)


def write_embedding_shard(path: Path, ids: np.ndarray, keys: list[str], sha1: list[str],
                          embeddings: np.ndarray) -> Path:
    """Write one shard atomically (temp file + rename). ids: (N,) int64; embeddings: (N, D) float16/float32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = embeddings.shape
    values = pa.array(np.ascontiguousarray(embeddings).reshape(-1))
    table = pa.table({"id": pa.array(np.asarray(ids, np.int64)), "key": pa.array(keys, pa.string()),
                      "sha1": pa.array(sha1, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(values, d)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_embedding_shard(path: Path, columns: tuple[str, ...] = ("id", "embedding")) -> dict[str, np.ndarray]:
    """Read a shard: ``id`` (N,) int64, ``embedding`` (N, D) float32, ``key``/``sha1`` (N,) object arrays."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=list(columns))
    out = {}
    for c in columns:
        col = t.column(c).combine_chunks()
        if c == "embedding":
            d = col.type.list_size
            out[c] = col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)  # (N, D)
        else:
            out[c] = col.to_numpy(zero_copy_only=False)
    return out


def embedding_dim(path: Path) -> int:
    """D of a shard's ``embedding`` column, from the parquet schema only."""
    import pyarrow.parquet as pq

    return pq.read_schema(path).field("embedding").type.list_size
