"""Storage URIs: a local path or ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``,
``file:///...`` or any other fsspec protocol (``memory://`` in tests), so every node of a Ray cluster shares
stage artifacts.

:func:`filesystem` resolves a URI to a ``pyarrow.fs.FileSystem`` and a path on it (pyarrow's own filesystems
for s3/gs/gcs/hdfs/file, fsspec wrapped in ``pyarrow.fs.PyFileSystem`` otherwise). Remote paths are
``/``-separated strings on that filesystem; local paths are :class:`~pathlib.Path`. The transfer helpers copy
whole files (object stores have no rename and no partial reads of a file being written): a download lands in a
temporary sibling and is renamed into place, so a partly downloaded file or directory never looks complete.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

#: Schemes resolved by ``pyarrow.fs.FileSystem.from_uri`` (falling back to fsspec when this pyarrow was built
#: without that filesystem).
PYARROW_SCHEMES = frozenset({"s3", "gs", "gcs", "hdfs", "viewfs", "file"})
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
_CHUNK = 8 << 20  # bytes per read when streaming a file


class StorageError(ValueError):
    """A storage URI that cannot be opened here (unknown protocol, missing optional dependency)."""


def is_uri(s: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (s3://, gs://, memory://, file://, ...); False for plain paths, including
    Windows drive paths like ``C:\\x`` or ``C:/x`` (a scheme has at least two characters)."""
    return isinstance(s, str) and _URI.match(s) is not None


def scheme(uri: str) -> str:
    """The lower-cased scheme of ``uri`` ("" for a plain path)."""
    m = _URI.match(uri)
    return m.group(1).lower() if m else ""


def join(base: str, *parts: str) -> str:
    """``/``-join a remote path or URI with relative parts (no duplicate slashes)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def _install_hint(proto: str) -> str:
    from fsspec.registry import known_implementations

    impl = known_implementations.get(proto)
    if impl is not None:
        return impl.get("err") or f"install the package providing {impl['class']}"
    return f"no fsspec implementation is registered for {proto!r}: install one (e.g. s3fs, gcsfs, adlfs)"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` for a storage URI (trailing ``/`` stripped).

    s3/gs/gcs/hdfs/viewfs/file go through ``pyarrow.fs.FileSystem.from_uri`` (credentials from the usual
    environment/config of each service); when pyarrow lacks that filesystem, and for every other protocol,
    fsspec's ``url_to_fs`` is wrapped as ``PyFileSystem(FSSpecHandler(fs))``.
    Raises StorageError (a ValueError) naming the URI and the package to install for an unknown protocol or a
    missing optional dependency.
    """
    if not is_uri(uri):
        raise StorageError(f"{uri!r} is not a storage URI (expected scheme://...)")
    proto, pa_error = scheme(uri), None
    if proto in PYARROW_SCHEMES:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
            return fs, path.rstrip("/") or "/"
        except (pa.ArrowNotImplementedError, ImportError) as e:  # pyarrow built without this filesystem
            pa_error = e
    try:
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:
        hint = f"{e}" + (f" (pyarrow: {pa_error})" if pa_error else "")
        raise StorageError(f"storage {uri!r} needs an optional dependency: {hint}") from e
    except ValueError as e:  # fsspec: "Protocol not known: ..."
        hint = _install_hint(proto)
        raise StorageError(f"storage {uri!r}: unknown protocol {proto!r} ({e}); {hint}") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/") or "/"


def mirror_root(uri: str) -> Path:
    """This node's local mirror of storage ``uri``: ``$KT_MIRROR`` if set, else
    ``~/.cache/kt/mirror/<first 12 hex of sha256(uri)>``. Not created here."""
    env = os.environ.get("KT_MIRROR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kt" / "mirror" / hashlib.sha256(uri.encode()).hexdigest()[:12]


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True when ``path`` is a file on ``fs`` (one metadata request)."""
    return fs.get_file_info(path).type == pafs.FileType.File


def list_files(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    """``{relative posix path: size in bytes}`` of the files under directory ``path`` on ``fs`` (recursive;
    ``{}`` when it does not exist), skipping dot-files (temporaries of an interrupted :func:`upload_file`)."""
    base = path.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    rels = {i.path[len(base):]: i.size for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(base)}
    return {r: n for r, n in rels.items() if not any(part.startswith(".") for part in r.split("/"))}


def local_files(root: Path) -> dict[str, int]:
    """``{relative posix path: size in bytes}`` of the files under local directory ``root`` (recursive),
    skipping dot-files (in-flight temporaries such as :func:`orchestrator.cache.write_atomic`'s)."""
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def upload_file(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """Copy local file ``local`` to ``path`` on ``fs``, replacing it. On object stores the object appears
    whole when the upload finishes; on a local filesystem it is written to a temporary sibling and moved into
    place.
    Raises OSError (pyarrow's errors are OSError subclasses) on failure."""
    parent = path.rsplit("/", 1)[0]
    if fs.type_name not in ("s3", "gcs"):  # object stores need no directories
        fs.create_dir(parent, recursive=True)
    atomic = fs.type_name == "local"
    dst = f"{parent}/.{path.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:8]}" if atomic else path
    try:
        with open(local, "rb") as src, fs.open_output_stream(dst) as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        if atomic:
            fs.move(dst, path)
    except BaseException:
        if atomic:
            try:
                fs.delete_file(dst)
            except OSError:
                pass
        raise


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes = b"") -> None:
    """Write ``data`` (a small payload, e.g. an empty commit marker) to ``path`` on ``fs``, creating parent
    directories where the filesystem has them. Raises OSError on failure."""
    if fs.type_name not in ("s3", "gcs"):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def download_file(fs: pafs.FileSystem, path: str, local: Path) -> Path:
    """Copy ``path`` on ``fs`` to local file ``local`` through a temporary sibling and a rename (readers see
    no partial file); creates parent directories. Raises FileNotFoundError/OSError on failure."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return local


def upload_dir(local: Path, fs: pafs.FileSystem, path: str, last: str | None = None,
               skip: frozenset[str] = frozenset()) -> list[str]:
    """Upload every file under local directory ``local`` (recursive, dot-files skipped) to directory ``path``
    on ``fs``; the relative path ``last``, if present, goes last (the commit marker). Relative paths in
    ``skip`` are not uploaded. Returns the relative paths uploaded, in order. Raises OSError on failure (files
    already uploaded stay; without ``last`` they do not form a complete entry)."""
    rels = sorted(r for r in local_files(local) if r not in skip)
    if last in rels:
        rels = [r for r in rels if r != last] + [last]
    for rel in rels:
        upload_file(local / rel, fs, join(path, rel))
    return rels


def download_dir(fs: pafs.FileSystem, path: str, local: Path, last: str | None = None) -> Path:
    """Download directory ``path`` on ``fs`` (recursive) to local directory ``local``, atomically: files land
    in a temporary sibling (``last``, the marker, written last) that is renamed to ``local``. An existing
    ``local`` holding ``last`` (a complete copy, e.g. from a concurrent download) is kept and the download
    discarded; one without it (an unfinished copy) is replaced. Returns ``local``. Raises OSError on failure
    (nothing of the download stays)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".dl-{local.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        rels = sorted(list_files(fs, path))
        if last in rels:
            rels = [r for r in rels if r != last] + [last]
        for rel in rels:
            download_file(fs, join(path, rel), tmp / rel)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if last is not None and (local / last).is_file():
        shutil.rmtree(tmp)
        return local
    try:
        if local.exists():
            shutil.rmtree(local)
        os.rename(tmp, local)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if last is not None and (local / last).is_file():  # lost a rename race to a complete copy: keep it
            return local
        raise
    return local
