"""The ``retrieval`` transfer-set source: embed the pool (Ray Data, cached per shard), index it (faiss,
cached), embed the labeled target images as queries, search, curate a manifest of pool ids (cached, hashed),
then fetch those images. Vemulapalli et al., ICML 2024 (arXiv 2311.18237), Sec. 3.2.

Cache entries (under ``<storage>/cache``): ``embeddings/<embedder, pool, preprocessing>``,
``index/<embeddings, plan>``, ``manifests/<index, queries, curation settings>``.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.cache import Cache
from orchestrator.config import PoolConfig, RetrievalConfig, config_hash
from orchestrator.data.loaders import DataError
from orchestrator.stages.compute import Meter
from orchestrator.stages.curate import Manifest
from orchestrator.stages.pools import PoolShard, list_shards, pool_fingerprint, read_shard_images

log = logging.getLogger(__name__)


@dataclass
class Embedder:
    """The model whose image encoder embeds pool and queries: a loadable ``id`` and a cache ``key``."""

    id: str
    model_kwargs: dict
    key: str


def embedder_for(rcfg: RetrievalConfig, teacher_id: str, teacher_key: str, teacher_kwargs: dict) -> Embedder:
    """``retrieval.embedder`` if set (keyed by its id, or a checkpoint file's SHA-256), else the teacher
    before adaptation (keyed as the pipeline keys it)."""
    if rcfg.embedder is None:
        return Embedder(teacher_id, teacher_kwargs, teacher_key)
    if rcfg.embedder.startswith("checkpoint/"):
        path = Path(rcfg.embedder.removeprefix("checkpoint/")).expanduser()
        if not path.is_file():
            from orchestrator.models.teachers import ModelLoadError

            raise ModelLoadError(f"embedder checkpoint {path} does not exist; fix transfer_set.retrieval.embedder")
        return Embedder(rcfg.embedder, {}, hashlib.sha256(path.read_bytes()).hexdigest()[:16])
    kw = rcfg.embedder_kwargs
    return Embedder(rcfg.embedder, kw, config_hash({"id": rcfg.embedder, **({"kw": kw} if kw else {})}))


def check_bad(results: list[dict], max_bad_fraction: float, root: str) -> dict:
    """Totals of an embedding pass; raises DataError if unreadable images or shards exceed the fraction."""
    images = sum(r["images"] for r in results)
    bad = sum(r["bad"] for r in results)
    failed = [r for r in results if r["error"]]
    stats = {"pool_shards": len(results), "pool_images": images, "bad_images": bad, "bad_shards": len(failed)}
    bad_frac = bad / max(1, images + bad)
    shard_frac = len(failed) / max(1, len(results))
    if bad_frac > max_bad_fraction or shard_frac > max_bad_fraction:
        detail = "; ".join(r["error"] for r in failed[:3])
        raise DataError(f"pool {root}: {bad} unreadable images ({bad_frac:.2%}) and {len(failed)} unreadable "
                        f"shards ({shard_frac:.2%}) exceed max_bad_fraction={max_bad_fraction}"
                        f"{' (' + detail + ')' if detail else ''}. Fix or remove them, or raise "
                        "transfer_set.retrieval.pool.max_bad_fraction")
    if bad or failed:
        log.warning("pool %s: skipped %d unreadable images and %d unreadable shards", root, bad, len(failed))
    return stats


def ensure_embeddings(rcfg: RetrievalConfig, emb: Embedder, shards: list[PoolShard], size: tuple[int, int],
                      channels: int, cache: Cache, gpus: float = 0.0) -> tuple[Path, dict]:
    """The pool's embedding shards (cached; a killed run resumes at the first unfinished shard).
    Returns (entry dir, stats incl. compute). Raises DataError when too many images/shards are unreadable."""
    from orchestrator.ray_adapters.embed import embed_pool

    key = config_hash({"embedder": emb.key, "pool": pool_fingerprint(rcfg.pool, shards), "size": size,
                       "channels": channels, "dtype": rcfg.dtype})
    hit = cache.lookup("embeddings", key)
    if hit is not None:
        import json

        return hit, {**json.loads((hit / "_meta.json").read_text()), "cache_hit": 1}
    out = cache.incremental("embeddings", key)
    with Meter(devices=rcfg.embed_actors) as m:
        results = embed_pool(shards, emb.id, emb.model_kwargs, rcfg.pool, size, channels, out, rcfg.dtype,
                             rcfg.embed_batch_size, rcfg.embed_actors, gpus,
                             entry=(cache.uri or str(cache.root.parent), "embeddings", key))
    stats = check_bad(results, rcfg.pool.max_bad_fraction, rcfg.pool.root)
    m.result.images = stats["pool_images"]
    meta = {**stats, "embedder": emb.id, "pool": rcfg.pool.root, "compute": m.result.to_dict(),
            "errors": [r["error"] for r in results if r["error"]]}
    cache.complete("embeddings", key, meta)
    return out, {**meta, "cache_hit": 0}


def embedding_shards(entry: Path) -> list[Path]:
    """The embedding parquet shards of an entry, in shard order."""
    return sorted(entry.glob("[0-9]*.parquet"))


def ensure_index(rcfg: RetrievalConfig, entry: Path, emb: Embedder, n: int, cache: Cache) -> Path:
    """The faiss index over an embeddings entry (cached), planned by pool size and memory budget."""
    from orchestrator.stages.embedding_io import embedding_dim
    from orchestrator.stages.index import build_index, plan_index

    parts = embedding_shards(entry)
    d = embedding_dim(parts[0])
    ic = rcfg.index
    plan = plan_index(n, d, int(ic.memory_budget_gb * 2**30), ic.kind, ic.exact_below)
    key = config_hash({"embeddings": entry.name, "plan": plan.to_dict()})
    hit = cache.lookup("index", key)
    if hit is not None:
        return hit
    log.info("building %s index (%s) over %d embeddings, d=%d", plan.kind, plan.factory, n, d)
    with cache.write("index", key, {"plan": plan.to_dict()}) as tmp:
        build_index(parts, plan, tmp, {"embedder": emb.key, "embeddings": entry.name})
    return cache.path("index", key)


def candidate_info(entry: Path, cand_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings (C, D) float32, pixel SHA-1s (C,) and keys of ``cand_ids`` ((C,) int64, sorted unique),
    read only from the shards that hold them."""
    from orchestrator.stages.embedding_io import read_embedding_shard, split_id

    shard_of, _ = split_id(cand_ids)
    embs, sha1, keys, order = [], [], [], []
    for s in np.unique(shard_of):
        t = read_embedding_shard(entry / f"{s:06d}.parquet", ("id", "key", "sha1", "embedding"))
        rows = np.searchsorted(t["id"], cand_ids[shard_of == s])  # ids are sorted within a shard
        embs.append(t["embedding"][rows])
        sha1 += list(t["sha1"][rows])
        keys += list(t["key"][rows])
        order.append(t["id"][rows])
    if not np.array_equal(np.concatenate(order), cand_ids):
        raise DataError(f"embeddings in {entry} do not hold every candidate id; delete the entry and rerun")
    return np.concatenate(embs), np.asarray(sha1, object), keys


def fetch_images(ids: np.ndarray, shards: list[PoolShard], pool: PoolConfig, size: tuple[int, int],
                 channels: int, skip_unreadable: bool = False, with_keys: bool = False):
    """Decode the pool images ``ids`` ((N,) int64) -> (N, H, W, C) uint8 in the same order, reading only the
    shards that hold them. Raises DataError if one is no longer readable (the pool changed), unless
    ``skip_unreadable``: then those ids are dropped with a warning. With ``with_keys`` returns (the ids kept
    (M,) int64, their keys, images (M, H, W, C)) instead of the images alone."""
    from orchestrator.stages.embedding_io import pool_id, split_id

    ids = np.asarray(ids, np.int64)
    shard_of, row_of = split_id(ids)
    by_id: dict[int, tuple[str, np.ndarray]] = {}
    for s in np.unique(shard_of):
        rows, keys, images, _ = read_shard_images(shards[s], pool, size, channels,
                                                  set(row_of[shard_of == s].tolist()))
        by_id.update(zip(pool_id(int(s), np.asarray(rows, np.int64)).tolist(), zip(keys, images)))
    found = np.asarray([int(i) in by_id for i in ids], bool)
    if not found.all():
        if not skip_unreadable:
            raise DataError(f"{int((~found).sum())} manifest images can no longer be read from pool {pool.root} "
                            "(it changed since it was embedded); rebuild the manifest")
        log.warning("pool %s: skipped %d of %d images that no longer decode", pool.root, int((~found).sum()),
                    len(ids))
        ids = ids[found]
    got = [by_id[int(i)] for i in ids]
    images = np.stack([g[1] for g in got]) if got else np.zeros((0, *size, channels), np.uint8)
    return (ids, [g[0] for g in got], images) if with_keys else images


def all_ids(entry: Path) -> np.ndarray:
    """Every embedded pool id, (N,) int64, in shard order."""
    from orchestrator.stages.embedding_io import read_embedding_shard

    return np.concatenate([read_embedding_shard(p, ("id",))["id"] for p in embedding_shards(entry)])


def domain_fraction(keys: list[str], prefix: str | None) -> float | None:
    """Fraction of ``keys`` starting with ``prefix`` (the demo pool's target-domain marker), or None."""
    if prefix is None or not keys:
        return None
    return float(np.mean([k.startswith(prefix) for k in keys]))


def manifest_keys(entry: Path, ids: np.ndarray) -> list[str]:
    """Keys of ``ids`` ((N,) int64) in the same order, from the embedding shards' id and key columns only."""
    from orchestrator.stages.embedding_io import read_embedding_shard, split_id

    shard_of, _ = split_id(ids)
    out = np.empty(len(ids), object)
    for s in np.unique(shard_of):
        t = read_embedding_shard(entry / f"{s:06d}.parquet", ("id", "key"))
        sel = np.flatnonzero(shard_of == s)
        out[sel] = t["key"][np.searchsorted(t["id"], ids[sel])]  # ids are sorted within a shard
    return list(out)


def save_manifest(m: Manifest, shards: list[PoolShard], path: Path) -> Path:
    """Write the manifest as parquet (id, score, query, rank, pseudo_label, key, shard) at ``path``."""
    import pyarrow.parquet as pq

    from orchestrator.stages.embedding_io import split_id

    shard_of, _ = split_id(m.id)
    pq.write_table(m.to_table(shards=[shards[s].name for s in shard_of]), path)
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest written by :func:`save_manifest`. Raises DataError if missing or malformed."""
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    try:
        return Manifest.from_table(pq.read_table(p))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read manifest {p} ({e}); fix transfer_set.retrieval.manifest") from None


def retrieval_transfer_set(ctx, cfg):
    """The ``retrieval`` transfer-set source (see module doc). ``ctx``: TransferContext with the cache, the
    unadapted teacher (embedder default) and, for ``balance``, the adapted teacher. Returns a TransferSet
    whose ``manifest`` is the saved manifest parquet. Raises ConfigError-like ValueError without a
    ``retrieval`` section, DataError for pool problems, IndexMismatchError, EmptyTransferSetError."""
    from orchestrator.transfer_sets.base import TransferSet

    rcfg = cfg.retrieval
    if rcfg is None:
        raise ValueError("transfer_set.source=retrieval needs a transfer_set.retrieval section with at least "
                         "pool.root and k or budget (see tasks/fashion_mnist_retrieval.yaml)")
    h, w, c = ctx.task.train.images.shape[1:]
    shards = list_shards(rcfg.pool)
    emb = embedder_for(rcfg, ctx.teacher_id, ctx.teacher_key, ctx.teacher_kwargs)
    entry, estats = ensure_embeddings(rcfg, emb, shards, (h, w), c, ctx.cache, ctx.gpus)
    if rcfg.manifest:
        m, mpath = load_manifest(rcfg.manifest), Path(rcfg.manifest).expanduser()
    else:
        m, mpath = curated_manifest(ctx, rcfg, emb, entry, estats["pool_images"], shards)
    keys = list(m.key) if m.key is not None else manifest_keys(entry, m.id)
    images = fetch_images(m.id, shards, rcfg.pool, (h, w), c)
    frac = domain_fraction(keys, rcfg.pool.target_domain_prefix)
    info = {k: float(v) for k, v in {**{k: estats[k] for k in ("pool_images", "bad_images", "bad_shards")},
                                      **m.stats}.items() if isinstance(v, (int, float))}
    if frac is not None:
        info["target_domain_fraction"] = frac
    key = config_hash({"manifest": m.content_hash(), "pool": pool_fingerprint(rcfg.pool, shards), "hwc": [h, w, c]})
    desc = (f"{len(m)} pool images retrieved for {len(np.unique(m.query))} queries from {rcfg.pool.root} "
            f"(manifest {m.content_hash()})")
    return TransferSet(images, "retrieval", desc, key, manifest=mpath, info=info)


def curated_manifest(ctx, rcfg: RetrievalConfig, emb: Embedder, entry: Path, n: int,
                     shards: list[PoolShard]) -> tuple[Manifest, Path]:
    """Search the index with the labeled images and curate (cached by index, queries and settings)."""
    from orchestrator.stages.curate import per_query_share, search_depth
    from orchestrator.stages.embed import embed_images, load_embedder
    from orchestrator.stages.index_search import search_index

    index_dir = ensure_index(rcfg, entry, emb, n, ctx.cache)
    labeled = ctx.task.train.subset(ctx.split.labeled)
    knobs = rcfg.model_dump(mode="json", include={"k", "budget", "dedup_threshold", "balance", "oversample"})
    key = config_hash({"index": index_dir.name, "queries": [emb.key, labeled.content_hash()], "knobs": knobs,
                       "search": [rcfg.index.nprobe, rcfg.index.ef_search],
                       "adapted": ctx.adapted_key if rcfg.balance else None})
    hit = ctx.cache.lookup("manifests", key)
    if hit is not None:
        import json

        log.info("manifest cache hit (%s)", key)
        m = load_manifest(hit / "manifest.parquet")
        m.stats = {**json.loads((hit / "_meta.json").read_text())["stats"], "manifest_cache_hit": 1}
        return m, hit / "manifest.parquet"
    share = per_query_share(len(labeled), rcfg.k, rcfg.budget)
    q = embed_images(load_embedder(emb.id, emb.model_kwargs), labeled.images)  # (Q, D) float32
    depth = search_depth(share, rcfg.oversample if rcfg.budget else 1.0, n)
    max_depth = min(n, 16 * depth)
    while True:  # budget mode: search deeper until duplicates and balance leave enough (at most 16x deeper)
        scores, ids = search_index(index_dir, q, depth, expect={"embedder": emb.key}, nprobe=rcfg.index.nprobe,
                                   ef_search=rcfg.index.ef_search)
        m = _curate(ctx, rcfg, scores, ids, share, entry, shards)
        if rcfg.budget is None or len(m) >= share.sum() or depth >= max_depth:
            if len(m) < share.sum():
                log.warning("retrieval found %d of the %d images asked for (searched %d neighbours per query): "
                            "raise transfer_set.retrieval.dedup_threshold towards 1 (fewer images count as "
                            "duplicates), lower the budget, or use a larger pool", len(m), share.sum(), depth)
            break
        log.info("%d of %d images after removing duplicates%s; searching %d neighbours per query instead of %d",
                 len(m), share.sum(), " and balancing" if rcfg.balance else "", min(max_depth, 2 * depth), depth)
        depth = min(max_depth, 2 * depth)
    m.stats["search_depth"] = depth
    m.stats["manifest_cache_hit"] = 0
    log.info("curated %d images from %d candidates (dropped: %d exact, %d near duplicates, %d for balance)",
             len(m), m.stats["candidates"], m.stats["exact_duplicates"], m.stats["near_duplicates"],
             m.stats["class_balance"])
    with ctx.cache.write("manifests", key, {"stats": m.stats, "hash": m.content_hash()}) as tmp:
        save_manifest(m, shards, tmp / "manifest.parquet")
    return m, ctx.cache.path("manifests", key) / "manifest.parquet"


def _curate(ctx, rcfg: RetrievalConfig, scores: np.ndarray, ids: np.ndarray, share: np.ndarray, entry: Path,
            shards: list[PoolShard]) -> Manifest:
    from orchestrator.stages.curate import curate

    cand = np.unique(ids[ids >= 0])
    cemb, csha, ckeys = candidate_info(entry, cand)
    labels = None
    if rcfg.balance:
        from orchestrator.stages.teacher_outputs import teacher_logits

        h, w, c = ctx.task.train.images.shape[1:]
        labels = teacher_logits(str(ctx.adapted), fetch_images(cand, shards, rcfg.pool, (h, w), c)).argmax(1)
    m = curate(scores, ids, ctx.split.labeled.astype(np.int64), share, fill=rcfg.budget is not None,
               cand_ids=cand, cand_emb=cemb, cand_sha1=csha, dedup_threshold=rcfg.dedup_threshold,
               pseudo_labels=labels, num_classes=ctx.task.num_classes)
    m.key = np.asarray(ckeys, object)[np.searchsorted(cand, m.id)]
    return m


def random_pool_sample(ctx, cfg, size: int):
    """The control arm: ``size`` pool images drawn uniformly (seed ``transfer_set.seed``) from the same
    embedded pool as the retrieval source. Returns a TransferSet (source ``random_pool_sample``)."""
    from orchestrator.transfer_sets.base import TransferSet

    rcfg = cfg.retrieval
    h, w, c = ctx.task.train.images.shape[1:]
    shards = list_shards(rcfg.pool)
    emb = embedder_for(rcfg, ctx.teacher_id, ctx.teacher_key, ctx.teacher_kwargs)
    entry, _ = ensure_embeddings(rcfg, emb, shards, (h, w), c, ctx.cache, ctx.gpus)
    pool = all_ids(entry)
    ids = np.sort(np.random.default_rng(cfg.seed).choice(pool, min(size, len(pool)), replace=False))
    keys = manifest_keys(entry, ids)
    info = {"pool_images": float(len(pool))}
    frac = domain_fraction(keys, rcfg.pool.target_domain_prefix)
    if frac is not None:
        info["target_domain_fraction"] = frac
    key = config_hash({"random": [int(cfg.seed), len(ids), hashlib.sha256(ids.tobytes()).hexdigest()],
                       "pool": pool_fingerprint(rcfg.pool, shards), "hwc": [h, w, c]})
    return TransferSet(fetch_images(ids, shards, rcfg.pool, (h, w), c), "random_pool_sample",
                       f"{len(ids)} pool images drawn at random from {rcfg.pool.root}", key, info=info)
