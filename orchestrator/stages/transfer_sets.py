"""Transfer-set sources (a plug-in kind): where the unlabeled images the teacher labels come from.

A source is ``fn(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet``. ``target_unlabeled`` uses the
task's unlabeled remainder; ``generic`` any other image pool (a dataset, or a random sample of a sharded
pool); ``retrieval`` curates a pool by kNN search with the labeled images as queries (:mod:`orchestrator.retrieval`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from orchestrator.config import PoolConfig, TransferSetConfig
from orchestrator.data.images import ImageSet, TaskData
from orchestrator.data.loaders import load_task_data
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


def _subsample(images: np.ndarray, cfg: TransferSetConfig) -> np.ndarray:
    if cfg.max_images and cfg.max_images < len(images):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(images), cfg.max_images, replace=False))
        return images[idx]
    return images


def _make(images: np.ndarray, source: str, description: str, cfg: TransferSetConfig) -> TransferSet:
    if len(images) == 0:
        raise ValueError(f"transfer set {source!r} is empty; check transfer_set settings")
    key = hashlib.sha256(cfg.model_dump_json().encode() + ImageSet(images).content_hash().encode()).hexdigest()[:16]
    return TransferSet(images, source, description, key)


@TRANSFER_SETS.register("target_unlabeled")
def target_unlabeled(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """The task's unlabeled remainder (train split minus the labeled subset)."""
    images = _subsample(ctx.task.train.images[ctx.split.unlabeled], cfg)
    return _make(images, "target_unlabeled", f"{len(images)} unlabeled target-task images", cfg)


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H, W, channels) uint8 (grayscale <-> RGB by repeat / BT.601 luma)."""
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return luma.round().clip(0, 255).astype(np.uint8)[..., None]


@TRANSFER_SETS.register("generic")
def generic(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """Any other image pool (``transfer_set.pool``), resized to the task's image size and converted to its
    channels: a dataset config (loaded wholly; its labels are ignored) or a sharded pool config (the paper's
    generic transfer set: ``max_images`` images drawn uniformly at random, see :func:`_generic_pool`)."""
    if cfg.pool is None:
        raise ValueError("transfer_set.source=generic needs transfer_set.pool (a dataset config, e.g. "
                         "{format: torchvision, name: MNIST} or {format: image_folder, root: ...}, or a sharded "
                         "pool, e.g. {format: webdataset, root: ...})")
    if isinstance(cfg.pool, PoolConfig):
        return _generic_pool(ctx, cfg)
    pool = load_task_data(cfg.pool)
    images = pool.train.images
    h, w, c = ctx.task.train.images.shape[1:]
    if images.shape[1:3] != (h, w):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        images = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    images = _subsample(match_channels(images, c), cfg)
    return _make(images, "generic", f"{len(images)} images from pool {cfg.pool.format}:{cfg.pool.name or cfg.pool.root}",
                 cfg)


def _generic_pool(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """``transfer_set.max_images`` (default: all) ids drawn uniformly with ``transfer_set.seed`` from every
    record of the sharded pool (no embeddings needed), decoded at the task's size and channels; images that no
    longer decode are dropped with a warning. Keyed by the ids, the pool's fingerprint, (H, W, C) and seed."""
    from orchestrator.config import config_hash
    from orchestrator.retrieval import domain_fraction, fetch_images
    from orchestrator.stages.pools import count_records, list_shards, pool_fingerprint, sample_pool_ids

    pool = cfg.pool
    h, w, c = ctx.task.train.images.shape[1:]
    shards = list_shards(pool)
    counts = [count_records(s, pool) for s in shards]
    drawn = sample_pool_ids(pool, shards, cfg.max_images, cfg.seed, counts=counts)
    ids, keys, images = fetch_images(drawn, shards, pool, (h, w), c, skip_unreadable=True, with_keys=True)
    if len(ids) == 0:
        raise ValueError(f"transfer set 'generic' is empty: pool {pool.root} holds no readable images; check "
                         "transfer_set.pool")
    info = {"pool_images": float(sum(counts)), "bad_images": float(len(drawn) - len(ids))}
    frac = domain_fraction(keys, pool.target_domain_prefix)
    if frac is not None:
        info["target_domain_fraction"] = frac
    key = config_hash({"generic": [hashlib.sha256(ids.tobytes()).hexdigest(), len(ids)],
                       "pool": pool_fingerprint(pool, shards), "hwc": [int(h), int(w), int(c)],
                       "seed": int(cfg.seed)})
    return TransferSet(images, "generic", f"{len(ids)} images drawn at random from pool {pool.root}", key,
                       info=info)


@TRANSFER_SETS.register("retrieval")
def retrieval(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """Retrieval-augmented: the labeled images' nearest neighbours in a large pool (Vemulapalli et al. 2024)."""
    from orchestrator.retrieval import retrieval_transfer_set

    return retrieval_transfer_set(ctx, cfg)


def build_transfer_set(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """Build the transfer set with the configured source. Raises UnknownNameError for an unknown source."""
    return TRANSFER_SETS.get(cfg.source)(ctx, cfg)
