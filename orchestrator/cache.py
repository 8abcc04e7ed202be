"""Content-addressed stage artifacts under the storage root, written atomically, with hit/miss counters.

An entry is a directory ``<root>/cache/<kind>/<key>/``. It is built in a temporary sibling directory and
renamed into place only when complete, so an interrupted stage never leaves a half-written entry. A complete
entry holds ``_meta.json`` and the ``_COMPLETE`` marker.

The storage may also be a URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``, any fsspec protocol; see
:mod:`orchestrator.storage`), shared by every node of a cluster. Entries then live remotely under
``<uri>/cache/<kind>/<key>/`` and each node keeps a local mirror (``root`` = ``<mirror_root(uri)>/cache``), so
:meth:`Cache.path` is always a local directory that numpy/faiss/torch read. Object stores have no rename: a
remote entry is complete once its ``_COMPLETE`` object exists, and every writer uploads it last.

Incremental entries (parts published one by one, e.g. embedding shards written by Ray actors on several
nodes): :meth:`Cache.incremental` first downloads the parts already published remotely that this node's mirror
lacks, so a job resumed on another node sees them as done with its usual local checks; each finished part is
uploaded with :meth:`Cache.publish_part` (data files before the file that marks the part done);
:meth:`Cache.complete` gathers the remaining parts both ways, then uploads ``_meta.json`` and ``_COMPLETE``.

Two processes of one node that need the same missing entry take turns (:meth:`Cache.claim`, an advisory
``flock`` under ``<root>/.locks``, released by the kernel when its holder dies): the first builds it, the
other waits and reuses it. Across nodes the atomic commit still keeps one copy, though both may build it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from orchestrator import storage as st

COMPLETE, META = "_COMPLETE", "_meta.json"
log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: readers see the old file or the
    whole new one, never a partial write."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_rows_csv(rows: list[dict], path: Path) -> Path:
    """``rows`` (dicts with the keys of the first) as a CSV with a header line, written atomically
    (:func:`write_atomic`)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return write_atomic(path, buf.getvalue())


class Cache:
    """Stage-artifact cache on a local path or a storage URI.

    Attributes:
        root: the local entries directory: ``<storage>/cache`` for a local path, ``<mirror_root(uri)>/cache``
            (this node's mirror) for a URI. remote: ``<uri>/cache`` for a URI, else None.
        hits, misses: per-kind counters for this process.
    """

    def __init__(self, storage: str | Path):
        """``storage``: a local path, or a URI string (a ``Path`` is always local). Raises StorageError (a
        ValueError) when the URI's filesystem cannot be opened here."""
        self.remote: str | None = None
        self._fs, self._rbase = None, ""
        if isinstance(storage, str) and st.is_uri(storage):
            self.uri = storage.rstrip("/")
            self.remote = st.join(self.uri, "cache")
            self.root = st.mirror_root(self.uri) / "cache"
            self._fs, base = st.filesystem(self.uri)
            self._rbase = st.join(base, "cache")
        else:
            self.uri = None
            self.root = Path(storage) / "cache"
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def __getstate__(self) -> dict:  # filesystems are re-opened where the cache is unpickled (Ray workers)
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self):
        """The remote ``pyarrow.fs.FileSystem`` (None for local storage), opened lazily after unpickling."""
        if self._fs is None and self.uri is not None:
            self._fs = st.filesystem(self.uri)[0]
        return self._fs

    def describe(self) -> str:
        """``<root>`` for local storage, ``<uri>/cache (mirror <root>)`` for remote storage, for logs."""
        return str(self.root) if self.remote is None else f"{self.remote} (mirror {self.root})"

    def path(self, kind: str, key: str) -> Path:
        """Where entry (kind, key) lives locally (it may not exist yet)."""
        return self.root / kind / key

    def remote_path(self, kind: str, key: str) -> str | None:
        """The entry's remote directory URI (None for local storage)."""
        return None if self.remote is None else st.join(self.remote, kind, key)

    def _rdir(self, kind: str, key: str) -> str:
        return st.join(self._rbase, kind, key)

    def _remote_complete(self, kind: str, key: str) -> bool:
        return st.exists(self.fs, st.join(self._rdir(kind, key), COMPLETE))

    def lookup(self, kind: str, key: str) -> Path | None:
        """The entry's local directory if complete (counted as a hit), else None (counted as a miss). With
        remote storage, an entry complete remotely but not in this node's mirror is downloaded first
        (atomically: a temporary sibling renamed into place)."""
        return self._count(kind, self._find(kind, key, mirror=True))

    def _find(self, kind: str, key: str, mirror: bool) -> Path | str | None:
        """The complete entry (not counted): this node's copy (``mirror``, downloaded when needed), or where it
        is read in place (:meth:`location`); None when it is not complete."""
        if not mirror:
            return self.location(kind, key)
        return self.path(kind, key) if self._present(kind, key) else None

    def _count(self, kind: str, hit: Path | str | None) -> Path | str | None:
        counter = self.hits if hit is not None else self.misses
        counter[kind] = counter.get(kind, 0) + 1
        return hit

    def location(self, kind: str, key: str) -> str | None:
        """Where a complete entry is read from without mirroring it (entries that stream, such as image shards):
        its remote URI with remote storage, its local directory otherwise; None when it is not complete. Not
        counted as a hit or a miss."""
        if self.remote is not None:
            return self.remote_path(kind, key) if self._remote_complete(kind, key) else None
        return str(self.path(kind, key)) if (self.path(kind, key) / COMPLETE).is_file() else None

    def _present(self, kind: str, key: str) -> bool:
        """Whether the entry is complete here, after downloading it when it is complete remotely (not counted)."""
        return (self.path(kind, key) / COMPLETE).is_file() or (self.remote is not None and self._fetch(kind, key))

    @contextmanager
    def lock(self, name: str, key: str) -> Iterator[None]:
        """Hold this node's exclusive lock ``(name, key)`` (``<root>/.locks/<name>-<key>.lock``, ``flock``):
        another process holding it is waited for, with a log line. The kernel releases it when the holder
        exits, killed or not, so a crashed run never leaves a stale lock. Not re-entrant within a process."""
        path = self.root / ".locks" / f"{name}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another run on this node is building %s %s: waiting for it, then reusing it", name, key)
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextmanager
    def claim(self, kind: str, key: str, mirror: bool = True) -> Iterator[Path | str | None]:
        """:meth:`lookup` the entry; on a miss, hold its build :meth:`lock` and look again (another run may
        have built it meanwhile: then it counts as a hit). Yields the entry, or None: build it (:meth:`write`)
        inside the ``with``, while the lock is held. ``mirror=False``: the entry is found where it is read in
        place (:meth:`location`: a remote entry is never downloaded) and that location is yielded."""
        hit = self._count(kind, self._find(kind, key, mirror))
        if hit is not None:
            yield hit
            return
        with self.lock(kind, key):
            hit = self._find(kind, key, mirror)
            if hit is not None:
                self.misses[kind] -= 1
                self.hits[kind] = self.hits.get(kind, 0) + 1
            yield hit

    def _fetch(self, kind: str, key: str) -> bool:
        """Download the remote entry into the mirror if it is complete there; True if it was."""
        if not self._remote_complete(kind, key):
            return False
        st.download_dir(self.fs, self._rdir(kind, key), self.path(kind, key), last=COMPLETE)
        return True

    @contextmanager
    def write(self, kind: str, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a temporary directory to fill; on success it becomes the entry (atomic rename).

        On an exception the temporary directory is removed and nothing is published. If another writer
        published the same entry first, its copy is kept and this one discarded. With remote storage the
        entry is uploaded (``_COMPLETE`` last) before the local rename, so a failed upload publishes nothing
        locally either (the remote files it left have no marker: a miss everywhere); an entry already complete
        remotely (another node won) is downloaded instead. Two nodes committing at the same instant may both
        upload: object stores offer no create-if-absent here, so the last upload wins file by file.
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / META).write_text(json.dumps(meta or {}, indent=1, default=str))
            (tmp / COMPLETE).write_text("")
            if self.remote is not None:
                if self._remote_complete(kind, key):  # a writer on another node won: keep its copy
                    shutil.rmtree(tmp)
                    if not (final / COMPLETE).is_file():
                        st.download_dir(self.fs, self._rdir(kind, key), final, last=COMPLETE)
                    return
                st.upload_dir(tmp, self.fs, self._rdir(kind, key), last=COMPLETE)
            if final.exists():  # stale incomplete entry (or a concurrent winner)
                if (final / COMPLETE).is_file():
                    shutil.rmtree(tmp)
                    return
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def incremental(self, kind: str, key: str) -> Path:
        """The entry's directory for a stage that publishes its parts one by one (each atomically), e.g.
        embedding shards, so a killed stage resumes without redoing finished parts. It becomes a complete
        entry only through :meth:`complete`.

        With remote storage, the parts already published remotely (by any node, :meth:`publish_part`) and
        missing here are downloaded first, so local "is this part done?" checks see them. Call it again to
        refresh."""
        p = self.path(kind, key)
        p.mkdir(parents=True, exist_ok=True)
        if self.remote is not None:
            self._pull_parts(kind, key)
        return p

    def _pull_parts(self, kind: str, key: str) -> list[str]:
        """Download the remote parts of (kind, key) missing locally (not the markers); returns their relative
        paths. Each file lands atomically; an interrupted pull is completed by the next one."""
        p, rdir = self.path(kind, key), self._rdir(kind, key)
        have = st.local_files(p)
        todo = [r for r in sorted(st.list_files(self.fs, rdir))
                if r not in have and r not in (COMPLETE, META)]
        for rel in todo:
            st.download_file(self.fs, st.join(rdir, rel), p / rel)
        return todo

    def publish_part(self, kind: str, key: str, *relpaths: str) -> list[str]:
        """Upload finished part files of an :meth:`incremental` entry (paths relative to its directory), in
        the given order: put the file that marks a part done (e.g. a shard's stats json) last. A no-op for
        local storage. Returns the remote URIs written. Raises ValueError for ``_COMPLETE``/``_meta.json``
        (only :meth:`complete` commits) and OSError on an upload failure."""
        if bad := {COMPLETE, META} & set(relpaths):
            raise ValueError(f"publish_part: {sorted(bad)} are written by complete(), not as parts")
        if self.remote is None:
            return []
        p, rdir = self.path(kind, key), self._rdir(kind, key)
        for rel in relpaths:
            st.upload_file(p / rel, self.fs, st.join(rdir, rel))
        return [st.join(self.remote, kind, key, rel) for rel in relpaths]

    def complete(self, kind: str, key: str, meta: dict | None = None) -> Path:
        """Mark an :meth:`incremental` entry complete (metadata first, then the ``_COMPLETE`` marker).

        With remote storage: parts published by other nodes are downloaded (the local entry becomes whole),
        local parts missing remotely or of another size are uploaded, then ``_meta.json`` and ``_COMPLETE``
        (the commit), then the local marker. If the entry is already complete remotely, that copy's metadata
        is kept and nothing is uploaded."""
        p = self.path(kind, key)
        if self.remote is not None:
            p.mkdir(parents=True, exist_ok=True)
            rdir = self._rdir(kind, key)
            self._pull_parts(kind, key)
            if self._remote_complete(kind, key):  # completed elsewhere first: keep that copy
                st.download_file(self.fs, st.join(rdir, META), p / META)
                (p / COMPLETE).write_text("")
                return p
            remote = st.list_files(self.fs, rdir)
            for rel, size in sorted(st.local_files(p).items()):
                if rel not in (COMPLETE, META) and remote.get(rel) != size:
                    st.upload_file(p / rel, self.fs, st.join(rdir, rel))
        write_atomic(p / META, json.dumps(meta or {}, indent=1, default=str))
        if self.remote is not None:
            st.upload_file(p / META, self.fs, st.join(rdir, META))
            st.put_bytes(self.fs, st.join(rdir, COMPLETE))
        (p / COMPLETE).write_text("")
        return p

    def counters(self) -> dict[str, int]:
        """``{"cache_hits_<kind>": n, "cache_misses_<kind>": n}`` for logging."""
        out = {f"cache_hits_{k}": v for k, v in self.hits.items()}
        out.update({f"cache_misses_{k}": v for k, v in self.misses.items()})
        return out
