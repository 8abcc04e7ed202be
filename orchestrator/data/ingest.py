"""ImageFolder ingest: list ``root/{train,test}/<class>/*``, check and decode every file, and write the encoded
bytes once into image shards (:mod:`orchestrator.data.shards`), a cache entry keyed by the folder's listing
(every file's relative path, size and modification time) and the decode settings; every later run reuses it.

The check runs over batches of files, in this process or (a ``runner``, e.g. the Ray Data adapter's
``read_binary_files`` pipeline) in parallel; either way every unreadable file is named in one error, and hidden
files (names starting with ``.``, such as macOS's ``._*`` copies) are skipped and counted.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from orchestrator.data.decode import decode_image
from orchestrator.data.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
INGEST_VERSION = 1  # bump when what a store holds changes
KIND = "image_shards"
SPLITS = ("train", "test")
MAX_LISTED_ERRORS = 50


@dataclass
class FolderListing:
    """The image files of an ImageFolder, in row order (train first, then test; classes sorted; files sorted).

    Attributes:
        root: the folder. paths: relative paths ("train/<class>/<file>"). labels: (N,) int64 class indices.
        splits: (N,) "train" / "test". classes: the train split's class names. hidden: hidden files skipped.
        stats: (N, 2) int64 file size in bytes and modification time (ns), what the store's key is made of.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    classes: list[str]
    hidden: int
    stats: np.ndarray

    def key(self, channels: int, size: int | None) -> str:
        """16 hex digits: the store's cache key (listing + decode settings + :data:`INGEST_VERSION`)."""
        h = hashlib.sha256(f"v{INGEST_VERSION}|{channels}|{size}|{self.classes}".encode())
        h.update("\n".join(self.paths).encode())
        h.update(np.ascontiguousarray(self.stats).tobytes())
        return h.hexdigest()[:16]


def class_dirs(root: Path) -> list[str]:
    """Sorted names of the class directories under ``root`` (hidden ones such as .ipynb_checkpoints skipped)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_classes(root: Path, found: list[str], classes: list[str]) -> None:
    """Raise DataError unless ``root``'s class directories are exactly the train split's ``classes``."""
    extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
    if extra:
        raise DataError(f"{root} has class directories {extra} that the train split does not have (train "
                        f"classes: {classes}). Fix: add images for them under train/, or remove them from {root}")
    if missing:
        raise DataError(f"{root} has no directory for train classes {missing}, so they would never be tested. "
                        f"Fix: add {root}/<class>/ with images for each")


def list_split(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str], int]:
    """The image files of one split ``root/<class>/*``: (files, class index of each, classes, hidden files
    skipped). ``classes`` (the train split's, when listing test/): the class directories must be exactly these.
    Raises DataError for a missing folder, no class directories, class directories that differ from
    ``classes``, or a class directory with no image files."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected {root}/<class>/<image files>")
    found = class_dirs(root)
    if classes is not None:
        check_classes(root, found, classes)
    classes = found if classes is None else classes
    if not classes:
        raise DataError(f"no class directories under {root}; expected {root}/<class>/<image files>")
    files, labels, hidden = [], [], 0
    for ci, c in enumerate(classes):
        entries = sorted(p for p in (root / c).iterdir() if p.is_file())
        shown = [p for p in entries if not p.name.startswith(".")]
        hidden += sum(p.suffix.lower() in IMAGE_EXTS for p in entries) - sum(p.suffix.lower() in IMAGE_EXTS
                                                                              for p in shown)
        imgs = [p for p in shown if p.suffix.lower() in IMAGE_EXTS]
        if not imgs:
            raise DataError(f"class directory {root / c} holds no image files (extensions: {sorted(IMAGE_EXTS)}), "
                            f"so class {c!r} would have no {root.name} images. Fix: add images or remove it")
        files += imgs
        labels += [ci] * len(imgs)
    return files, labels, classes, hidden


def list_image_folder(root: Path) -> FolderListing:
    """List ``root/train`` and ``root/test`` (same classes). Raises DataError as :func:`list_split` does."""
    paths, labels, splits, hidden, classes = [], [], [], 0, None
    for split in SPLITS:
        files, lab, classes, hid = list_split(root / split, classes)
        paths += [str(f.relative_to(root)) for f in files]
        labels += lab
        splits += [split] * len(files)
        hidden += hid
    stats = np.array([(s.st_size, s.st_mtime_ns) for s in ((root / p).stat() for p in paths)], np.int64)
    return FolderListing(root, paths, np.asarray(labels, np.int64), splits, classes, hidden, stats.reshape(-1, 2))


def check_batch(batch: dict, root: str, channels: int, size: int | None) -> dict:
    """Check and decode a batch of files: ``{"row": (B,) int64, "path": (B,) relative paths[, "bytes": (B,)
    the files' contents]}`` -> ``{"row", "bytes", "height", "width" ((B,) int64, 0 when unreadable), "error"
    ((B,) str, "" when readable)}``. Files are read from ``root`` when ``bytes`` is not given."""
    out = {"row": np.asarray(batch["row"], np.int64), "bytes": [], "height": [], "width": [], "error": []}
    for i, rel in enumerate(batch["path"]):
        path = Path(root) / str(rel)
        dims: list = [0, 0]
        try:
            data = bytes(batch["bytes"][i]) if "bytes" in batch else path.read_bytes()
            decode_image(data, channels, size, path, dims)
            err = ""
        except DataError as e:
            err = str(e)
        except OSError as e:
            err = f"corrupt or unreadable image {path}: {e}. Fix: delete or replace this file"
        out["bytes"].append(b"" if err else data)
        out["height"].append(dims[0])
        out["width"].append(dims[1])
        out["error"].append(err)
    return {k: np.asarray(v, dtype=object if k in ("bytes", "error") else np.int64) for k, v in out.items()}


Runner = Callable[[FolderListing, Callable[[dict], dict], int], Iterable[dict]]


def in_process(listing: FolderListing, fn: Callable[[dict], dict], batch_size: int) -> Iterator[dict]:
    """Run ``fn`` over the listing's files in batches of ``batch_size``, in this process, on
    :func:`~orchestrator.data.shards.decode_threads` threads (Pillow releases the GIL while it decodes), in
    order; at most twice as many batches in flight as threads."""
    from orchestrator.data.shards import decode_threads, map_ahead

    def batch(s: int) -> dict:
        rows = np.arange(s, min(s + batch_size, len(listing.paths)))
        return fn({"row": rows, "path": listing.paths[s:s + batch_size]})

    threads = decode_threads()
    for _, out in map_ahead(batch, range(0, len(listing.paths), batch_size), 2 * threads, threads):
        yield out


def unreadable_error(root: Path, errors: list[str]) -> DataError:
    """One DataError naming every unreadable file (the first :data:`MAX_LISTED_ERRORS`, then a count)."""
    shown = "\n  ".join(errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    if len(errors) == 1:
        return DataError(errors[0])
    return DataError(f"{len(errors)} image files under {root} cannot be used:\n  {shown}{more}\n"
                     "Fix: delete or replace each, then run again")


def write_store(listing: FolderListing, out_dir: Path, channels: int, size: int | None,
                runner: Runner | None = None, batch_size: int = 256) -> dict:
    """Check every file of ``listing`` and write the readable ones into image shards under ``out_dir``.

    Returns ``{"images": N, "bytes": encoded bytes}``. Raises DataError naming every unreadable file at once, or
    (without ``size``) when a split's images differ in size."""
    from orchestrator.data.shards import ShardWriter

    fn = lambda b: check_batch(b, str(listing.root), channels, size)  # noqa: E731
    writer, errors, nbytes = ShardWriter(out_dir), [], 0
    shapes: dict[str, set] = {s: set() for s in SPLITS}
    for b in (runner or in_process)(listing, fn, batch_size):
        for row, data, h, w, err in zip(b["row"], b["bytes"], b["height"], b["width"], b["error"]):
            if err:
                errors.append((int(row), str(err)))
                continue
            split = listing.splits[row]
            shapes[split].add((int(h), int(w), channels))
            writer.add(int(row), data, int(listing.labels[row]), split, listing.paths[row], int(h), int(w))
            nbytes += len(data)
    if errors:
        raise unreadable_error(listing.root, [e for _, e in sorted(errors)])
    for split in SPLITS:
        if size is None and len(shapes[split]) > 1:
            raise DataError(f"images under {listing.root / split} have different sizes {sorted(shapes[split])[:3]}..."
                            "; set data.image_size")
    return {"images": writer.close(), "bytes": nbytes}


def ingest_image_folder(root: Path, channels: int, size: int | None, storage: str | Path,
                        runner: Runner | None = None) -> tuple[str, FolderListing]:
    """The image store of an ImageFolder (built once, then reused): (its location, a local path or a URI to read
    it from without mirroring, and the listing). ``storage``: the cache's storage root or URI."""
    from orchestrator.cache import Cache

    listing = list_image_folder(root)
    if listing.hidden:
        log.info("%s: skipped %d hidden files (names starting with '.', e.g. macOS '._*' copies)", root,
                 listing.hidden)
    key = listing.key(channels, size)
    cache = Cache(storage)
    with cache.claim(KIND, key, mirror=False) as loc:  # read in place: a remote store is never downloaded
        if loc is None:
            log.info("ingesting %s: checking %d image files and writing them into image shards", root,
                     len(listing.paths))
            with cache.write(KIND, key, {"root": str(root), "version": INGEST_VERSION}) as tmp:
                info = write_store(listing, tmp, channels, size, runner)
            log.info("image shards %s: %d images, %.1f MB encoded", key, info["images"], info["bytes"] / 1e6)
    return loc or cache.location(KIND, key), listing
