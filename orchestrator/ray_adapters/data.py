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


def read_logits(shard_dir: Path, n: int) -> np.ndarray:
    """Read (index, logits) parquet shards back into (n, K) float32 in index order. Raises ValueError if
    any index is missing or repeated."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx_parts, logit_parts = [], []
    for f in sorted(shard_dir.glob("*.parquet")):
        t = pq.read_table(f)
        col = t.column("logits").combine_chunks()
        col = col.storage if isinstance(col, pa.ExtensionArray) else col
        idx_parts.append(t.column("index").to_numpy())
        logit_parts.append(col.flatten().to_numpy().reshape(len(col), -1))
    index = np.concatenate(idx_parts)
    if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
        raise ValueError(f"teacher-output shards in {shard_dir} hold {len(index)} rows for {n} images")
    out = np.empty((n, logit_parts[0].shape[1]), np.float32)
    out[index] = np.concatenate(logit_parts)
    return out


def teacher_inference(checkpoint: str, images: np.ndarray, out_dir: Path, batch_size: int = 512,
                      actors: int = 2, gpus_per_actor: float = 0.0) -> np.ndarray:
    """Run the adapted teacher over ``images`` ((N, H, W, C) uint8) with a Ray Data actor pool.

    Each of ``actors`` actors loads the checkpoint once (1 CPU and ``gpus_per_actor`` GPUs each) and maps
    batches of ``batch_size``. Results stream back to the driver, which writes them to ``out_dir`` as parquet
    shards of ``(index, logits)`` (no Write tasks compete with the actors for CPUs). Returns (N, K) float32.
    """
    import ray

    from orchestrator.stages.teacher_outputs import TeacherPredictor

    ensure_ray()
    ds = images_dataset(images, blocks=max(actors * 4, len(images) // 4096))
    out = ds.map_batches(
        TeacherPredictor, fn_constructor_kwargs={"checkpoint": checkpoint, "num_threads": 1},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
        num_cpus=1, num_gpus=gpus_per_actor)
    write_shards(out.iter_batches(batch_size=None, batch_format="numpy"), out_dir)
    return read_logits(out_dir, len(images))


def write_shards(batches, out_dir: Path, rows_per_shard: int = 65536) -> int:
    """Write ``{"index": (B,), "logits": (B, K)}`` batches as parquet shards of about ``rows_per_shard`` rows.
    Returns the number of shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    buf: list[dict] = []
    rows = shards = 0

    def flush():
        nonlocal buf, rows, shards
        if not buf:
            return
        idx = np.concatenate([b["index"] for b in buf])
        logits = np.concatenate([b["logits"] for b in buf]).astype(np.float32)  # (n, K) float32
        col = pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1])
        pq.write_table(pa.table({"index": idx, "logits": col}), out_dir / f"shard-{shards:05d}.parquet")
        buf, rows, shards = [], 0, shards + 1

    for b in batches:
        buf.append(b)
        rows += len(b["index"])
        if rows >= rows_per_shard:
            flush()
    flush()
    return shards
