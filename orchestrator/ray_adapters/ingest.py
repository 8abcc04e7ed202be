"""Ray Data adapter: an ImageFolder's files read (``read_binary_files``), checked and decoded in parallel tasks
on every node; the driver streams the results into image shards (:func:`orchestrator.data.ingest.write_store`).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterator

import numpy as np

from orchestrator.ray_adapters.session import ensure_ray

log = logging.getLogger(__name__)
INGEST_RAY_MIN_FILES = 20_000  # data.ingest=auto: from this many files on, on a cluster, Ray Data checks them


def use_ray_data(ingest: str, files: int) -> bool:
    """Whether ``data.ingest`` (auto | in_process | ray_data) runs the check on Ray Data for ``files`` files:
    ``auto`` does from :data:`INGEST_RAY_MIN_FILES` files on when this process joins a cluster
    (``$RAY_ADDRESS``: more nodes' CPUs to use); alone on one machine, the in-process check's threads use its
    cores without starting a local Ray (whose own processes took 2.2 GiB of resident memory for a 20,000-file
    folder: benchmarks/data_plane.py)."""
    if ingest == "ray_data":
        return True
    return ingest == "auto" and files >= INGEST_RAY_MIN_FILES and bool(os.environ.get("RAY_ADDRESS"))


def ray_data_runner(listing, fn: Callable[[dict], dict], batch_size: int) -> Iterator[dict]:
    """A :data:`~orchestrator.data.ingest.Runner`: ``read_binary_files`` over the listing's files, ``fn`` (the
    check) in Ray Data tasks, results streamed back in batches with each file's row in the listing."""
    import ray

    ensure_ray()
    log.info("checking %d files in Ray Data tasks (read_binary_files)", len(listing.paths))
    root = str(listing.root)
    row_of = {p: i for i, p in enumerate(listing.paths)}
    ds = ray.data.read_binary_files([os.path.join(root, p) for p in listing.paths], include_paths=True)

    def check(batch: dict) -> dict:  # {"bytes": (B,) object, "path": (B,) str} -> fn's columns + "path"
        rel = [os.path.relpath(str(p), root) for p in batch["path"]]
        out = fn({"row": np.zeros(len(rel), np.int64), "path": rel, "bytes": list(batch["bytes"])})
        out["path"] = np.asarray(rel, dtype=object)
        return out

    for b in ds.map_batches(check, batch_size=batch_size, batch_format="numpy").iter_batches(
            batch_size=None, batch_format="numpy"):
        b["row"] = np.array([row_of[str(p)] for p in b["path"]], np.int64)
        yield b


def runner_for(ingest: str):
    """The :data:`~orchestrator.data.ingest.Runner` of ``data.ingest`` (auto | in_process | ray_data): per folder,
    :func:`ray_data_runner` where :func:`use_ray_data` says so, else the in-process threads."""
    from orchestrator.data.ingest import in_process

    def run(listing, fn: Callable[[dict], dict], batch_size: int):
        use = ray_data_runner if use_ray_data(ingest, len(listing.paths)) else in_process
        return use(listing, fn, batch_size)

    return run
