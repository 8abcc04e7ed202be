"""Content-addressed stage artifacts under the storage root, written atomically, with hit/miss counters.

An entry is a directory ``<root>/cache/<kind>/<key>/``. It is built in a temporary sibling directory and
renamed into place only when complete, so an interrupted stage never leaves a half-written entry.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


class Cache:
    """Stage-artifact cache.

    Attributes:
        root: ``<storage>/cache``. hits, misses: per-kind counters for this process.
    """

    def __init__(self, storage: str | Path):
        self.root = Path(storage) / "cache"
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def path(self, kind: str, key: str) -> Path:
        """Where entry (kind, key) lives (it may not exist yet)."""
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> Path | None:
        """The entry's directory if complete (counted as a hit), else None (counted as a miss)."""
        p = self.path(kind, key)
        if (p / "_COMPLETE").is_file():
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return p
        self.misses[kind] = self.misses.get(kind, 0) + 1
        return None

    @contextmanager
    def write(self, kind: str, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a temporary directory to fill; on success it becomes the entry (atomic rename).

        On an exception the temporary directory is removed and nothing is published. If another writer
        published the same entry first, its copy is kept and this one discarded.
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / "_meta.json").write_text(json.dumps(meta or {}, indent=1, default=str))
            (tmp / "_COMPLETE").write_text("")
            if final.exists():  # stale incomplete entry (or a concurrent winner)
                if (final / "_COMPLETE").is_file():
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
        entry only through :meth:`complete`."""
        p = self.path(kind, key)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def complete(self, kind: str, key: str, meta: dict | None = None) -> Path:
        """Mark an :meth:`incremental` entry complete (metadata first, then the ``_COMPLETE`` marker)."""
        p = self.path(kind, key)
        write_atomic(p / "_meta.json", json.dumps(meta or {}, indent=1, default=str))
        (p / "_COMPLETE").write_text("")
        return p

    def counters(self) -> dict[str, int]:
        """``{"cache_hits_<kind>": n, "cache_misses_<kind>": n}`` for logging."""
        out = {f"cache_hits_{k}": v for k, v in self.hits.items()}
        out.update({f"cache_misses_{k}": v for k, v in self.misses.items()})
        return out
