"""Image pools for retrieval, read shard by shard (Ray-free; the Ray Data adapter maps these over actors).

A pool is a list of :class:`PoolShard` (a WebDataset tar, a parquet file, or a chunk of an image directory);
an image's stable id is (shard, key), packed as int64 by :func:`orchestrator.stages.embedding_io.pool_id`.
Unreadable images are skipped and counted, never fatal here; the caller enforces ``max_bad_fraction``.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from orchestrator.config import PoolConfig
from orchestrator.data.loaders import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class PoolShard:
    """One unit of pool work. ``index``: position in the sorted shard list (the high bits of pool ids);
    ``name``: path relative to the pool root; ``files``: the files it reads (one, or a chunk for image_dir)."""

    index: int
    name: str
    files: tuple[str, ...]
    bytes: int


def list_shards(cfg: PoolConfig) -> list[PoolShard]:
    """The pool's shards in a stable (sorted) order. Raises DataError if the root is missing or empty."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"pool root {root} does not exist; fix transfer_set.retrieval.pool.root "
                        "(for the offline demo, build it with `kt make-demo-pool TASK`)")
    if cfg.format == "image_dir":
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        chunks = [files[i:i + cfg.shard_size] for i in range(0, len(files), cfg.shard_size)]
        shards = [PoolShard(i, f"{c[0].relative_to(root)}+{len(c)}", tuple(map(str, c)),
                            sum(p.stat().st_size for p in c)) for i, c in enumerate(chunks)]
    else:
        ext = ".tar" if cfg.format == "webdataset" else ".parquet"
        files = sorted(p for p in root.rglob(f"*{ext}") if p.is_file())
        shards = [PoolShard(i, str(p.relative_to(root)), (str(p),), p.stat().st_size) for i, p in enumerate(files)]
    shards = shards[: cfg.max_shards]
    if not shards:
        raise DataError(f"pool {root} holds no {cfg.format} data (expected "
                        f"{'*.tar' if cfg.format == 'webdataset' else '*.parquet' if cfg.format == 'parquet' else 'image files'}); "
                        "fix transfer_set.retrieval.pool.root or .format")
    return shards


def pool_fingerprint(cfg: PoolConfig, shards: list[PoolShard]) -> str:
    """16-hex-digit hash of the pool's layout (format, shard names and sizes in bytes, image/key columns)."""
    h = hashlib.sha256(f"{cfg.format}|{cfg.image_column}|{cfg.key_column}|{cfg.shard_size}|{len(shards)}".encode())
    for s in shards:
        h.update(f"|{s.name}:{s.bytes}".encode())
    return h.hexdigest()[:16]


def _tar_records(path: str, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """WebDataset convention: members ``<key>.<ext>`` grouped by key (the basename up to its first dot).
    ``read=False`` yields None for the bytes (the stream skips the member's data)."""
    with tarfile.open(path, "r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if f".{ext.lower()}" in IMAGE_EXTS:
                f = tar.extractfile(m) if read else None
                yield (f"{d}/{stem}" if d else stem), (f.read() if f else None)


def _parquet_file(path: str, image_column: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if image_column not in names:
        raise DataError(f"parquet pool shard {path} has no column {image_column!r} (columns: {names}); "
                        "set transfer_set.retrieval.pool.image_column")
    return pf


def _parquet_records(path: str, image_column: str, key_column: str | None) -> Iterator[tuple[str, bytes | None]]:
    pf = _parquet_file(path, image_column)
    names = pf.schema_arrow.names
    cols = [image_column] + ([key_column] if key_column and key_column in names else [])
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=1024):
        images = batch.column(0).to_pylist()
        keys = batch.column(1).to_pylist() if len(cols) > 1 else [str(row + i) for i in range(len(images))]
        for k, v in zip(keys, images):
            yield str(k), (v.get("bytes") if isinstance(v, dict) else v)
        row += len(images)


def iter_records(shard: PoolShard, cfg: PoolConfig) -> Iterator[tuple[str, bytes | None]]:
    """Yield (key, encoded image bytes or None) in the shard's order. Raises (tarfile/pyarrow/OSError) if the
    shard itself is unreadable; the caller counts it as a bad shard."""
    if cfg.format == "webdataset":
        yield from _tar_records(shard.files[0])
    elif cfg.format == "parquet":
        yield from _parquet_records(shard.files[0], cfg.image_column, cfg.key_column)
    else:
        root = Path(cfg.root).expanduser()
        for f in shard.files:
            try:
                data = Path(f).read_bytes()
            except OSError:
                data = None
            yield str(Path(f).relative_to(root)), data


def count_records(shard: PoolShard, cfg: PoolConfig) -> int:
    """The number of records :func:`iter_records` yields for ``shard`` (unreadable images included, so rows
    match pool ids), without reading image bytes: tar headers, parquet metadata, or the file list.
    Raises DataError if the shard itself is unreadable."""
    try:
        if cfg.format == "webdataset":
            return sum(1 for _ in _tar_records(shard.files[0], read=False))
        if cfg.format == "parquet":
            return _parquet_file(shard.files[0], cfg.image_column).metadata.num_rows
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile/pyarrow/OSError: the shard is unreadable
        raise DataError(f"pool shard {shard.name} in {cfg.root} is unreadable ({type(e).__name__}: {e}); "
                        "fix or remove it") from None
    return len(shard.files)


def sample_pool_ids(cfg: PoolConfig, shards: list[PoolShard], n: int | None, seed: int,
                    counts: list[int] | None = None) -> np.ndarray:
    """``n`` pool ids drawn uniformly without replacement (``np.random.default_rng(seed)``) from every record
    of ``shards``; all of them when ``n`` is None or at least the pool size. Needs no embeddings: records are
    counted by :func:`count_records` (or given as ``counts``, one per shard). Returns (n,) int64, sorted."""
    from orchestrator.stages.embedding_io import pool_id

    counts = np.asarray([count_records(s, cfg) for s in shards] if counts is None else counts, np.int64)
    total = int(counts.sum())
    flat = np.arange(total, dtype=np.int64) if n is None or n >= total else \
        np.sort(np.random.default_rng(seed).choice(total, n, replace=False).astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(counts)])
    pos = np.searchsorted(starts, flat, side="right") - 1  # position in ``shards`` of each drawn record
    index = np.asarray([s.index for s in shards], np.int64)
    return np.sort(pool_id(index[pos], flat - starts[pos])) if total else np.zeros(0, np.int64)


def decode_image(data: bytes | None, size: tuple[int, int], channels: int) -> np.ndarray | None:
    """Encoded bytes -> (H, W, channels) uint8 resized to ``size`` (H, W) (bilinear, antialiased), or None if
    the bytes are not a readable image. Transparency is composited onto white."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")  # transparent pixels onto white, as image pools are usually shown
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=None)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "skip this image"
        return None
    return arr[..., None] if arr.ndim == 2 else arr


def read_shard_images(shard: PoolShard, cfg: PoolConfig, size: tuple[int, int], channels: int,
                      rows: set[int] | None = None) -> tuple[list[int], list[str], np.ndarray, int]:
    """Decode a shard's images (only ``rows`` if given). Returns (rows, keys, images (N, H, W, C) uint8,
    bad count). Row = position in the shard, counting unreadable images too, so ids stay stable."""
    out_rows, keys, images, bad = [], [], [], 0
    for row, (key, data) in enumerate(iter_records(shard, cfg)):
        if rows is not None and row not in rows:
            continue
        img = decode_image(data, size, channels)
        if img is None:
            bad += 1
            continue
        out_rows.append(row)
        keys.append(key)
        images.append(img)
    arr = np.stack(images) if images else np.zeros((0, *size, channels), np.uint8)
    return out_rows, keys, arr, bad
