"""Ray Data adapter: embed a pool shard by shard with an actor pool (the embedder loaded once per actor).

The dataset's rows are shard descriptors, one block each, so Ray Data spreads shards over the actors and
nodes; each actor reads, decodes, embeds and writes its shard to shared storage itself (no embeddings pass
through the driver), and shards already written are not scheduled again.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from orchestrator.config import PoolConfig
from orchestrator.ray_adapters.session import ensure_ray
from orchestrator.stages.pools import PoolShard

log = logging.getLogger(__name__)


def _shared_embedder():
    """ShardEmbedder writing into this node's copy of a cache entry and publishing each finished shard to the
    storage root (a no-op for local storage), so shards embedded on any node reach every other."""
    from orchestrator.cache import Cache
    from orchestrator.stages.embed import ShardEmbedder, shard_paths

    class SharedShardEmbedder(ShardEmbedder):
        def __init__(self, storage: str, kind: str, key: str, **kwargs):
            self.cache, self.kind, self.key = Cache(storage), kind, key
            super().__init__(out_dir=str(self.cache.incremental(kind, key)), **kwargs)

        def embed_shard(self, shard: PoolShard) -> dict:
            out = super().embed_shard(shard)
            if not out["error"]:
                parquet, stats = shard_paths(self.out_dir, shard.index)
                self.cache.publish_part(self.kind, self.key, parquet.name, stats.name)  # stats last: done marker
            return out

    return SharedShardEmbedder


def embed_pool(shards: list[PoolShard], embedder: str, model_kwargs: dict, pool: PoolConfig,
               size: tuple[int, int], channels: int, out_dir: Path, dtype: str = "float16",
               batch_size: int = 256, actors: int = 2, gpus_per_actor: float = 0.0,
               entry: tuple[str, str, str] | None = None) -> list[dict]:
    """Embed every shard not yet in ``out_dir``. Returns one dict per shard of ``shards``:
    ``{"index", "images", "bad", "error"}`` (``error`` non-empty for an unreadable shard; it wrote nothing).
    ``entry``: (storage root or URI, kind, key) of the cache entry ``out_dir`` mirrors: actors then write into
    their own node's copy and publish each shard to the storage root."""
    import ray

    from orchestrator.stages.embed import ShardEmbedder, shard_paths

    done = {s.index for s in shards if shard_paths(out_dir, s.index)[1].is_file()}
    pending = [s for s in shards if s.index not in done]
    errors: dict[int, str] = {}
    if pending:
        log.info("embedding %d of %d pool shards with %s (%d Ray Data actors; %d shards already done)",
                 len(pending), len(shards), embedder, min(actors, len(pending)), len(done))
        ensure_ray()
        rows = [{"index": s.index, "name": s.name, "files": list(s.files), "bytes": s.bytes} for s in pending]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        kwargs = {"embedder": embedder, "model_kwargs": model_kwargs, "pool": pool.model_dump(),
                  "size": tuple(size), "channels": channels, "dtype": dtype, "batch_size": batch_size,
                  "num_threads": 1}
        cls = ShardEmbedder
        if entry is None:
            kwargs["out_dir"] = str(out_dir)
        else:
            cls = _shared_embedder()
            kwargs.update(storage=entry[0], kind=entry[1], key=entry[2])
        out = ds.map_batches(
            cls, batch_size=1, batch_format="numpy", num_cpus=1, num_gpus=gpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(pending))), fn_constructor_kwargs=kwargs)
        t0, n = time.perf_counter(), 0
        for b in out.iter_batches(batch_size=None, batch_format="numpy"):
            for i, imgs, bad, err in zip(b["index"], b["images"], b["bad"], b["error"]):
                n += 1
                if err:
                    errors[int(i)] = str(err)
                    log.warning("pool shard %d unreadable, skipped: %s", i, err)
                else:
                    log.info("embedded shard %d: %d images, %d unreadable (%d/%d, %.0f s)", i, imgs, bad, n,
                             len(pending), time.perf_counter() - t0)
    if entry is not None:  # shards other nodes published: into this node's copy before reading their stats
        from orchestrator.cache import Cache

        Cache(entry[0]).incremental(entry[1], entry[2])
    results = []
    for s in shards:
        stats = shard_paths(out_dir, s.index)[1]
        if stats.is_file():
            results.append({**json.loads(stats.read_text()), "error": ""})
        else:
            results.append({"index": s.index, "name": s.name, "images": 0, "bad": 0,
                            "error": errors.get(s.index, "not embedded")})
    return results
