"""The pool transfer-set sources (``generic``, ``retrieval``) and :func:`build_transfer_set`.

They live above :mod:`orchestrator.stages` because they reach the pool readers, the embedding cache and
(through :mod:`orchestrator.transfer_sets.retrieval`) Ray Data; the registry and ``target_unlabeled`` stay in
:mod:`orchestrator.transfer_sets.base`, which imports nothing above it.
"""
from __future__ import annotations

import hashlib


from orchestrator.config import PoolConfig, TransferSetConfig, config_hash
from orchestrator.data.loaders import load_task_data
from orchestrator.transfer_sets.retrieval import domain_fraction, fetch_images, retrieval_transfer_set
from orchestrator.stages.pools import count_records, list_shards, pool_fingerprint, sample_pool_ids
from orchestrator.transfer_sets.base import (TRANSFER_SETS, TransferContext, TransferSet, make_transfer_set,
                                               match_channels, subsample)


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
    images = subsample(match_channels(images, c), cfg)
    return make_transfer_set(images, "generic", f"{len(images)} images from pool {cfg.pool.format}:{cfg.pool.name or cfg.pool.root}",
                 cfg)


def _generic_pool(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """``transfer_set.max_images`` (default: all) ids drawn uniformly with ``transfer_set.seed`` from every
    record of the sharded pool (no embeddings needed), decoded at the task's size and channels; images that no
    longer decode are dropped with a warning. Keyed by the ids, the pool's fingerprint, (H, W, C) and seed."""
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
def retrieval_source(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """Retrieval-augmented: the labeled images' nearest neighbours in a large pool (Vemulapalli et al. 2024)."""
    return retrieval_transfer_set(ctx, cfg)


def build_transfer_set(ctx: TransferContext, cfg: TransferSetConfig) -> TransferSet:
    """Build the transfer set with the configured source. Raises UnknownNameError for an unknown source."""
    return TRANSFER_SETS.get(cfg.source)(ctx, cfg)
