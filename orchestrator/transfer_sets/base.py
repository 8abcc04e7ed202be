"""Transfer-set sources (a plug-in kind): where the unlabeled images the teacher labels come from.

A source is ``fn(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet``. ``target_unlabeled`` (here)
uses the task's unlabeled remainder; the pool sources ``generic`` and ``retrieval`` are registered by
:mod:`orchestrator.transfer_sets.pools`, which also holds :func:`~orchestrator.transfer_sets.pools.build_transfer_set`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from orchestrator.config import DatasetConfig, TransferSetConfig
from orchestrator.data.images import ImageSet, TaskData
from orchestrator.data.shards import take
from orchestrator.data.splits import Split
from orchestrator.registry import Registry


@dataclass
class TransferContext:
    """What a source may use: the task data and its split (labels of the unlabeled part are never read);
    for pool sources also the stage cache, the teacher before adaptation (a loadable id, its cache key and
    kwargs: the default retrieval embedder) and the adapted teacher checkpoint (pseudo-labels)."""

    task: TaskData
    split: Split
    cache: Any = None
    teacher_id: str | None = None
    teacher_key: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    adapted: Path | None = None
    adapted_key: str | None = None
    gpus: float = 0.0


@dataclass
class TransferSet:
    """Unlabeled transfer images.

    Attributes:
        images: (N, H, W, C) uint8, converted to the task's channels.
        source: the source name. description: human-readable provenance.
        key: 16-hex-digit content hash (images + source settings): the teacher-output cache key part.
        manifest: the pool-id manifest (parquet) for pool sources. info: numbers to log (counts, fractions).
    """

    images: np.ndarray
    source: str
    description: str
    key: str
    manifest: Path | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


TRANSFER_SETS: Registry[Callable[[TransferContext, TransferSetConfig], TransferSet]] = Registry(
    "transfer-set source")


def subsample(images: np.ndarray, cfg: TransferSetConfig) -> np.ndarray:
    if cfg.max_images and cfg.max_images < len(images):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(images), cfg.max_images, replace=False))
        return take(images, idx)
    return images


def make_transfer_set(images: np.ndarray, source: str, description: str, cfg: TransferSetConfig) -> TransferSet:
    if len(images) == 0:
        raise ValueError(f"transfer set {source!r} is empty; check transfer_set settings")
    how = {"pool": {"in_memory_max_mb", "ingest"}} if isinstance(cfg.pool, DatasetConfig) else None  # not which
    key = hashlib.sha256(cfg.model_dump_json(exclude=how).encode() + ImageSet(images).content_hash().encode())
    key = key.hexdigest()[:16]
    return TransferSet(images, source, description, key)


@TRANSFER_SETS.register("target_unlabeled")
def target_unlabeled(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """The task's unlabeled remainder (train split minus the labeled subset)."""
    images = subsample(take(ctx.task.train.images, ctx.split.unlabeled), cfg)  # image shards: a lazy view
    return make_transfer_set(images, "target_unlabeled", f"{len(images)} unlabeled target-task images", cfg)


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H, W, channels) uint8 (grayscale <-> RGB by repeat / BT.601 luma)."""
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return luma.round().clip(0, 255).astype(np.uint8)[..., None]
