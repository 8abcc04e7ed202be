"""Ray Data adapter: teacher inference over the transfer set with an actor pool (teacher loaded once per
actor), writing (index, logits) parquet shards."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from orchestrator.ray_adapters.session import ensure_ray

log = logging.getLogger(__name__)


def images_dataset(images: np.ndarray, blocks: int):
    """A Ray Dataset with columns ``index`` (int64) and ``image`` ((H, W, C) uint8 tensors), in ``blocks``."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    tables = []
    for idx in np.array_split(np.arange(len(images)), max(1, min(blocks, len(images)))):
        tables.append(pa.table({"index": pa.array(idx, pa.int64()),
                                "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[idx]))}))
    return ray.data.from_arrow(tables)


def order_logits(index: np.ndarray, logits: np.ndarray, n: int, where: str) -> np.ndarray:
    """Place rows by ``index`` ((n,) int64) into (n, K) float32. Raises ValueError if any index is missing or
    repeated."""
    if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
        raise ValueError(f"teacher outputs in {where} hold {len(index)} rows for {n} images")
    out = np.empty((n, logits.shape[1]), np.float32)
    out[index] = logits
    return out


def teacher_inference(checkpoint: str, images: np.ndarray, out_dir: Path, batch_size: int = 512,
                      actors: int = 2, gpus_per_actor: float = 0.0, features: bool = False):
    """Run the adapted teacher over ``images`` ((N, H, W, C) uint8) with a Ray Data actor pool.

    Each of ``actors`` actors loads the checkpoint once (1 CPU and ``gpus_per_actor`` GPUs each) and maps
    batches of ``batch_size``. Results stream back to the driver, which writes them to ``out_dir`` as parquet
    shards of ``(index, logits)`` (no Write tasks compete with the actors for CPUs). Returns (N, K) float32
    logits, or with ``features`` the pair (logits, (N, D) float16 penultimate features).
    """
    import ray

    from orchestrator.stages.teacher_outputs import TeacherPredictor

    ensure_ray()
    ds = images_dataset(images, blocks=max(actors * 4, len(images) // 4096))
    out = ds.map_batches(
        TeacherPredictor, fn_constructor_kwargs={"checkpoint": checkpoint, "num_threads": 1, "features": features},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
        num_cpus=1, num_gpus=gpus_per_actor)
    feats: list[np.ndarray] = []

    def batches():  # features stay in memory (float16); the shards hold (index, logits)
        for b in out.iter_batches(batch_size=None, batch_format="numpy"):
            if features:
                feats.append(b.pop("features"))
            yield b

    index, logits = write_shards(batches(), out_dir)
    ordered = order_logits(index, logits, len(images), str(out_dir))
    if not features:
        return ordered
    f = np.empty((len(images), feats[0].shape[1]), np.float16)  # (N, D) float16
    f[index] = np.concatenate(feats)
    return ordered, f


def write_shards(batches, out_dir: Path, rows_per_shard: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Write ``{"index": (B,), "logits": (B, K)}`` batches as parquet shards of about ``rows_per_shard`` rows.
    Returns everything written: (index (N,) int64, logits (N, K) float32), in arrival order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    buf: list[dict] = []
    done_idx: list[np.ndarray] = []
    done_logits: list[np.ndarray] = []

    def flush():
        if not buf:
            return
        idx = np.concatenate([b["index"] for b in buf]).astype(np.int64)
        logits = np.concatenate([b["logits"] for b in buf]).astype(np.float32)  # (n, K) float32
        col = pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1])
        pq.write_table(pa.table({"index": idx, "logits": col}), out_dir / f"shard-{len(done_idx):05d}.parquet")
        done_idx.append(idx)
        done_logits.append(logits)
        buf.clear()

    for b in batches:
        buf.append(b)
        if sum(len(x["index"]) for x in buf) >= rows_per_shard:
            flush()
    flush()
    return np.concatenate(done_idx), np.concatenate(done_logits)
