"""Encoded-image shards: the on-disk representation that streams.

An image store is a directory (a local path or a storage URI: ``file://``, ``s3://``, ...) holding

- ``shard-00000.tar``, ...: WebDataset-style tars of the images' encoded bytes as read (JPEG, PNG, WebP, ...),
  one member ``<row>.<ext>`` per image, about ``shard_bytes`` each;
- ``index.parquet``: one row per image, in row order: ``shard`` (int32), ``offset`` and ``length`` (int64, the
  member's bytes inside its tar), ``label`` (int64, -1 when unknown), ``split`` (string), ``key`` (string: the
  relative path it was read from), ``height``/``width`` (int32, after mode conversion, before resizing).

:class:`ShardedImages` is a lazy (N, H, W, C) uint8 view over rows of a store: indexing a batch reads only those
members (one ranged read each, straight from the storage URI: nothing is mirrored whole) and decodes them; a
subset is another view (:func:`take`). Decoding more than the decode limit (``$KT_DECODE_LIMIT_BYTES``, default
1 GiB) into one array raises :class:`MaterializationError`: no stage can hold a whole large set in one process
by accident. :meth:`ShardedImages.materialize` is the deliberate exception (the
size decision of a loader, for sets that fit comfortably in memory).

Cost: one ``index.parquet`` of about 70 bytes per image is read by every process that opens the store (89 MB
for 1.27 M images); images cost their encoded bytes on disk and one decode per use.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from orchestrator import storage as st
from orchestrator.data.decode import decode_image

INDEX = "index.parquet"
DECODE_LIMIT_ENV = "KT_DECODE_LIMIT_BYTES"
DEFAULT_DECODE_LIMIT = 1 << 30
INDEX_COLUMNS = ("shard", "offset", "length", "label", "split", "key", "height", "width")


class MaterializationError(RuntimeError):
    """A whole large image set was about to be decoded into one array (see the module docstring)."""


_POOL = None


def decode_threads() -> int:
    """Threads that decode one batch (``$KT_DECODE_THREADS``, default min(4, CPUs))."""
    return max(1, int(os.environ.get("KT_DECODE_THREADS", min(4, os.cpu_count() or 1))))


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(decode_threads(), thread_name_prefix="kt-decode")
    return _POOL


def map_ahead(fn: Callable, items: Iterable, ahead: int, threads: int = 1) -> Iterator[tuple]:
    """``(item, fn(item))`` for each item, in order, computed on ``threads`` background threads with at most
    ``ahead`` items in flight (decoding or checking images while the caller trains or writes)."""
    from concurrent.futures import ThreadPoolExecutor

    it = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="kt-ahead") as ex:
        queue = deque((x, ex.submit(fn, x)) for x in islice(it, ahead))
        while queue:
            x, fut = queue.popleft()
            queue.extend((y, ex.submit(fn, y)) for y in islice(it, 1))
            yield x, fut.result()


def decode_limit() -> int:
    """The most bytes one request may decode into an array (``$KT_DECODE_LIMIT_BYTES``, default 1 GiB)."""
    return int(os.environ.get(DECODE_LIMIT_ENV, DEFAULT_DECODE_LIMIT))


class ShardWriter:
    """Write images (encoded bytes, as read) into tar shards and an index, in any arrival order.

    ``add(row, data, ...)`` appends one image; ``close()`` writes ``index.parquet`` sorted by row (rows must be
    0..N-1, each once). The directory is normally a cache entry being built (written atomically by the cache).
    """

    def __init__(self, out_dir: Path, shard_bytes: int = 128 << 20):
        self.out_dir, self.shard_bytes = Path(out_dir), shard_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[tuple] = []
        self._tar: tarfile.TarFile | None = None
        self._shard, self._written = -1, 0

    def _next_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._shard += 1
        self._written = 0
        self._tar = tarfile.open(self.out_dir / f"shard-{self._shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)

    def add(self, row: int, data: bytes, label: int, split: str, key: str, height: int, width: int) -> None:
        """Append image ``row``'s encoded ``data`` (bytes)."""
        if self._tar is None or self._written >= self.shard_bytes:
            self._next_shard()
        info = tarfile.TarInfo(f"{row:09d}{Path(key).suffix.lower() or '.img'}")
        info.size = len(data)
        offset = self._tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT))  # the member's bytes follow its header
        self._tar.addfile(info, io.BytesIO(data))
        self.rows.append((int(row), self._shard, offset, len(data), int(label), split, key,
                          int(height), int(width)))
        self._written += len(data) + 1024

    def close(self) -> int:
        """Finish the last shard and write the index. Returns the number of images. Raises ValueError when the
        rows are not exactly 0..N-1."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._tar is not None:
            self._tar.close()
        self.rows.sort()
        if [r[0] for r in self.rows] != list(range(len(self.rows))):
            raise ValueError(f"shard rows are not 0..{len(self.rows) - 1}, each once")
        cols = list(zip(*self.rows)) if self.rows else [[] for _ in range(9)]
        types = (pa.int32(), pa.int64(), pa.int64(), pa.int64(), pa.string(), pa.string(), pa.int32(), pa.int32())
        table = pa.table({n: pa.array(c, t) for n, c, t in zip(INDEX_COLUMNS, cols[1:], types)})
        pq.write_table(table, self.out_dir / INDEX)
        return len(self.rows)


class ImageStore:
    """An opened image store (see the module docstring): its index in memory, shard files opened on demand.

    Attributes:
        location: the store's directory, a local path or a storage URI (str).
        shard, offset, length, label, height, width: (N,) index columns (int32/int64). split, key: (N,) object.
    """

    _open: dict[str, "ImageStore"] = {}  # per-process: every view of a store shares one index

    def __init__(self, location: str | Path):
        import pyarrow.parquet as pq

        self.location = str(location)
        self._fs = None
        if st.is_uri(self.location):
            self._fs, self._base = st.filesystem(self.location)
            with self._fs.open_input_file(st.join(self._base, INDEX)) as f:
                t = pq.read_table(f)
        else:
            self._base = self.location
            t = pq.read_table(Path(self.location) / INDEX)
        for c in INDEX_COLUMNS:
            setattr(self, c, t.column(c).to_numpy(zero_copy_only=False))
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, location: str | Path) -> "ImageStore":
        """The store at ``location``, opened once per process."""
        loc = str(location)
        if loc not in cls._open:
            cls._open[loc] = cls(loc)
        return cls._open[loc]

    def __len__(self) -> int:
        return len(self.shard)

    def _file(self, shard: int):
        """This process's handle of a shard: a file descriptor (local) or a pyarrow random-access file (URI).
        Reads are positional (no shared offset), and a forked child (a DataLoader worker) opens its own."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            name = f"shard-{shard:05d}.tar"
            f = (self._fs.open_input_file(st.join(self._base, name)) if self._fs is not None
                 else os.open(Path(self._base) / name, os.O_RDONLY))
            if len(self._files) >= 64:  # bound the open handles
                old = self._files.pop(next(iter(self._files)))
                os.close(old) if isinstance(old, int) else old.close()
            self._files[shard] = f
        return f

    def read(self, rows: np.ndarray) -> list[bytes]:
        """The encoded bytes of ``rows`` ((M,) int64), in that order: one positional ranged read per image."""
        out = []
        for r in np.asarray(rows, np.int64):
            f, off, n = self._file(int(self.shard[r])), int(self.offset[r]), int(self.length[r])
            out.append(os.pread(f, n, off) if isinstance(f, int) else f.read_at(n, off))
        return out

    def fingerprint(self) -> str:
        """16 hex digits naming this store's content: the cache key it was written under (its directory's name)."""
        return Path(self.location.rstrip("/")).name[:16]


class ShardedImages:
    """A lazy (N, H, W, C) uint8 image array over rows of an :class:`ImageStore` (see the module docstring).

    Args:
        location: the store (local path or URI). rows: (N,) int64 store rows, in this view's order.
        size: (H, W) every image is decoded to. channels: 1 or 3.
        resize: decode with a resize to ``size`` (the store's images differ in size), else at their own size.
        in_memory_max_bytes: the loader's size decision (``data.in_memory_max_mb``), carried to subsets: an
            ImageSet subset at most this size (and 64 MiB) is decoded once (a labeled subset), 0: never.
    Indexing with an int decodes one (H, W, C) image; with a slice, index array or mask, a batch decodes to
    (b, H, W, C) uint8 (over :func:`decode_limit` bytes: MaterializationError). A subset that stays lazy is
    :meth:`view` (:func:`take` for either kind of image set).
    """

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, location: str, rows: np.ndarray, size: tuple[int, int], channels: int, resize: bool,
                 in_memory_max_bytes: float = 0.0):
        self.location, self.rows = str(location), np.asarray(rows, np.int64)
        self.size, self.channels, self.resize = (int(size[0]), int(size[1])), int(channels), bool(resize)
        self.in_memory_max_bytes = float(in_memory_max_bytes)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), *self.size, self.channels)

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.rows)

    def view(self, idx) -> "ShardedImages":
        """The view of ``self.rows[idx]`` (never decodes)."""
        return ShardedImages(self.location, self.rows[idx], self.size, self.channels, self.resize,
                             self.in_memory_max_bytes)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Decode store ``rows`` ((b,) int64) -> (b, H, W, C) uint8, on :func:`decode_threads` threads (Pillow
        releases the GIL while it decodes)."""
        store = ImageStore.open(self.location)
        out = np.empty((len(rows), *self.size, self.channels), np.uint8)  # (b, H, W, C) uint8
        size = self.size[0] if self.resize else None

        def one(i: int, data: bytes) -> None:
            out[i] = decode_image(data, self.channels, size, store.key[rows[i]])

        blobs = store.read(rows)
        if len(rows) < 16 or decode_threads() == 1:
            for i, data in enumerate(blobs):
                one(i, data)
        else:
            list(_pool().map(one, range(len(rows)), blobs))
        return out

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return np.asarray(self[key[0]])[(slice(None),) * (0 if np.ndim(key[0]) == 0 else 1) + key[1:]]
        if np.ndim(key) == 0 and not isinstance(key, slice):
            return self.decode(self.rows[[int(key)]])[0]
        return np.asarray(self.view(key))  # a batch; a subset that stays lazy is view(idx) (see take)

    def __array__(self, dtype=None, copy=None):
        if self.nbytes > decode_limit():
            raise MaterializationError(
                f"decoding {len(self)} images ({self.nbytes / 2**20:.0f} MiB) into one array is over the decode "
                f"limit ({decode_limit() / 2**20:.0f} MiB, ${DECODE_LIMIT_ENV}): read this set in batches "
                "(index it with a batch of rows), or materialize() it deliberately")
        out = self.decode(self.rows)
        return out if dtype is None else out.astype(dtype)

    def iter_batches(self, batch_size: int):
        """Yield (b, H, W, C) uint8 batches of this view, in order."""
        for s in range(0, len(self), batch_size):
            yield self.decode(self.rows[s:s + batch_size])

    def materialize(self, batch_size: int = 1024) -> np.ndarray:
        """Decode the whole view into one (N, H, W, C) uint8 array, batch by batch (the size decision: only for
        sets that fit comfortably in memory)."""
        out = np.empty(self.shape, np.uint8)
        for i, b in enumerate(self.iter_batches(batch_size)):
            out[i * batch_size:i * batch_size + len(b)] = b
        return out

    def content_hash(self) -> str:
        """16 hex digits over the store's content key, the rows and the decode settings (no decoding)."""
        h = hashlib.sha256(f"{ImageStore.open(self.location).fingerprint()}|{self.size}|{self.channels}|"
                           f"{self.resize}".encode())
        h.update(self.rows.tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"location": self.location, "size": list(self.size), "channels": self.channels,
                "resize": self.resize}


def take(images, idx):
    """The subset ``idx`` of an image set without decoding it: a lazy view of :class:`ShardedImages`, the
    indexed rows of an array."""
    return images.view(idx) if isinstance(images, ShardedImages) else images[idx]


MANIFEST = "images.json"


def save_images(out_dir: Path, images) -> Path:
    """Save a set's images for other processes: an array as ``images.npy``; a :class:`ShardedImages` view as a
    manifest (``images.json`` and its rows, ``images_rows.npy``), never its pixels. Returns the file written."""
    out_dir = Path(out_dir)
    if isinstance(images, ShardedImages):
        np.save(out_dir / "images_rows.npy", images.rows)
        (out_dir / MANIFEST).write_text(json.dumps(images.to_dict()))
        return out_dir / MANIFEST
    np.save(out_dir / "images.npy", images)
    return out_dir / "images.npy"


class RemoteNpy:
    """A read-only ``.npy`` array on a storage URI, read row by row with positional ranged reads (never
    downloaded whole): ``shape``, ``dtype``, ``len``, and ``a[idx]`` -> the rows as an array."""

    def __init__(self, uri: str):
        self.uri, self._f = uri, None
        f = self._file()
        buf = io.BytesIO(f.read_at(min(f.size(), 4096), 0))
        read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(buf) == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(buf)
        if fortran:
            raise ValueError(f"{uri}: Fortran-ordered arrays are not read row by row")
        self.shape, self.dtype, self._offset = tuple(shape), np.dtype(dtype), buf.tell()
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def _file(self):
        """This process's handle (reopened after unpickling in a worker)."""
        if self._f is None:
            fs, path = st.filesystem(self.uri)
            self._f = fs.open_input_file(path)
        return self._f

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_f": None}

    def __getitem__(self, idx) -> np.ndarray:
        f = self._file()
        rows = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx, np.int64)
        scalar = np.ndim(rows) == 0
        rows = np.atleast_1d(rows)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for i, r in enumerate(rows):
            out[i] = np.frombuffer(f.read_at(self._row, self._offset + int(r) * self._row),
                                   self.dtype).reshape(self.shape[1:])
        return out[0] if scalar else out


def open_array(entry: str | Path, name: str):
    """Array file ``name`` of a cache entry: a read-only memmap (a local directory) or a :class:`RemoteNpy`
    (a storage URI: rows are read as they are indexed, nothing is mirrored)."""
    if st.is_uri(str(entry)):
        return RemoteNpy(st.join(str(entry), name))
    return np.load(Path(entry) / name, mmap_mode="r")


def _read_small(entry: str | Path, name: str) -> bytes | None:
    """A small file of an entry (local or URI), or None when it is not there."""
    if st.is_uri(str(entry)):
        fs, path = st.filesystem(st.join(str(entry), name))
        return fs.open_input_file(path).read() if st.exists(fs, path) else None
    p = Path(entry) / name
    return p.read_bytes() if p.is_file() else None


def open_images(entry: str | Path):
    """The images :func:`save_images` wrote under ``entry`` (a local directory or a storage URI): the array of
    ``images.npy`` (:func:`open_array`), or the :class:`ShardedImages` view of the manifest. Raises
    FileNotFoundError when neither is there."""
    manifest = _read_small(entry, MANIFEST)
    if manifest is not None:
        m = json.loads(manifest)
        rows = np.load(io.BytesIO(_read_small(entry, "images_rows.npy")))
        return ShardedImages(m["location"], rows, tuple(m["size"]), m["channels"], m["resize"])
    try:
        return open_array(entry, "images.npy")
    except (FileNotFoundError, OSError):
        raise FileNotFoundError(f"{entry} holds neither images.npy nor {MANIFEST}") from None
