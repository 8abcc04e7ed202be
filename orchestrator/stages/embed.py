"""Image embeddings for retrieval: the embedder's image encoder (a teacher's backbone; open_clip towers run
``encode_image``), L2-normalised so inner product = cosine similarity.

:class:`ShardEmbedder` is a callable class over batches of shard descriptors: the Ray Data adapter runs it as
an actor pool (the embedder loaded once per actor); each call decodes whole pool shards, embeds them and writes
one embedding shard per pool shard (atomically), so a killed job resumes at the first unfinished shard.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from orchestrator.cache import write_atomic
from orchestrator.config import PoolConfig
from orchestrator.stages.accel import autocast, prepare_model, to_device
from orchestrator.stages.embedding_io import pool_id, write_embedding_shard
from orchestrator.stages.pools import PoolShard, read_shard_images


@torch.inference_mode()
def embed_images(model, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, D) float32 L2-normalised features of ``model`` (a Teacher: its own
    preprocessing, then ``features``)."""
    out = [np.zeros((0, model.feature_dim), np.float32)]
    for s in range(0, len(images), batch_size):
        x = to_device(model.preprocess(images[s:s + batch_size]), device)  # (B, C, H', W') float32
        with autocast(device):  # bf16 (or fp16) on CUDA, a no-op on the CPU
            f = torch.nn.functional.normalize(model.features(x).float(), dim=1)  # (B, D) float32
        out.append(f.cpu().numpy())
    return np.concatenate(out)


def load_embedder(embedder: str, model_kwargs: dict | None = None):
    """The embedder as a Teacher in eval mode (any teacher id; ``checkpoint/<path>`` included)."""
    from orchestrator.models.teachers import load_teacher

    return load_teacher(embedder, model_kwargs).eval()


def shard_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    """(embedding parquet, stats json) of pool shard ``index`` under an embeddings entry."""
    return out_dir / f"{index:06d}.parquet", out_dir / f"{index:06d}.json"


def pixel_hashes(images: np.ndarray) -> list[str]:
    """SHA-1 of each decoded image's pixels ((N, H, W, C) uint8): equal hashes = exact duplicates."""
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


class ShardEmbedder:
    """Embed whole pool shards. Batches are ``{"index": (B,) int64, "name": (B,) str, "files": (B,) lists,
    "bytes": (B,) int64}`` (shard descriptors); returns ``{"index", "images", "bad", "error"}`` per shard.

    A shard whose stats file exists is skipped (resume). An unreadable shard returns its error and writes
    nothing, so the next run retries it. Args: ``embedder`` model id, ``pool`` PoolConfig as a dict,
    ``size`` (H, W) and ``channels`` the images are decoded to (the task's), ``out_dir`` the entry directory.
    """

    def __init__(self, embedder: str, model_kwargs: dict, pool: dict, size: tuple[int, int], channels: int,
                 out_dir: str, dtype: str = "float16", batch_size: int = 256, num_threads: int | None = None,
                 device: str | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = prepare_model(load_embedder(embedder, model_kwargs), self.device)  # channels-last on CUDA
        self.pool = PoolConfig.model_validate(pool)
        self.size, self.channels, self.out_dir = tuple(size), channels, Path(out_dir)
        self.dtype, self.batch_size = np.dtype(dtype), batch_size

    def embed_shard(self, shard: PoolShard) -> dict:
        parquet, stats = shard_paths(self.out_dir, shard.index)
        if stats.is_file():
            return {**json.loads(stats.read_text()), "error": ""}
        try:
            rows, keys, images, bad = read_shard_images(shard, self.pool, self.size, self.channels)
        except Exception as e:  # noqa: BLE001 - a corrupt tar/parquet: count the shard as bad, go on
            return {"index": shard.index, "images": 0, "bad": 0, "error": f"{shard.name}: {type(e).__name__}: {e}"}
        emb = embed_images(self.model, images, self.batch_size, self.device).astype(self.dtype)  # (N, D)
        write_embedding_shard(parquet, pool_id(shard.index, np.asarray(rows, np.int64)), keys,
                              pixel_hashes(images), emb)
        info = {"index": shard.index, "name": shard.name, "images": len(rows), "bad": bad}
        write_atomic(stats, json.dumps(info))
        return {**info, "error": ""}

    def __call__(self, batch: dict) -> dict:
        results = [self.embed_shard(PoolShard(int(i), str(n), tuple(f), int(b)))
                   for i, n, f, b in zip(batch["index"], batch["name"], batch["files"], batch["bytes"])]
        return {k: np.asarray([r[k] for r in results]) for k in ("index", "images", "bad", "error")}
