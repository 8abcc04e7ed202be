"""Ray Data adapter: teacher inference over the transfer set with an actor pool (teacher loaded once per
actor), writing (index, logits) parquet shards."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from orchestrator.ray_adapters.session import ensure_ray

log = logging.getLogger(__name__)


def blocks_dataset(n: int, blocks: int, images: np.ndarray | None = None):
    """A Ray Dataset of ``blocks`` in-memory blocks (no read tasks: those would wait for CPUs that the actor pool
    holds) with the column ``index`` (int64, 0..n-1) and, given ``images`` ((n, H, W, C) uint8), ``image``
    ((H, W, C) uint8 tensors)."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    def table(idx: np.ndarray):
        cols = {"index": pa.array(idx, pa.int64())}
        if images is not None:
            cols["image"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(images[idx]))
        return pa.table(cols)

    return ray.data.from_arrow([table(idx) for idx in np.array_split(np.arange(n), max(1, min(blocks, n)))])


def teacher_inference(checkpoint: str, images: np.ndarray, out_dir: Path, batch_size: int = 512,
                      actors: int = 2, gpus_per_actor: float = 0.0, features: bool = False,
                      views: tuple[np.ndarray, int] | None = None):
    """Run the adapted teacher over ``images`` ((N, H, W, C) uint8: an array, or a lazy view over image shards
    that the actors read from the storage) with a Ray Data actor pool.

    Each of ``actors`` actors loads the checkpoint once (1 CPU and ``gpus_per_actor`` GPUs each) and maps
    batches of ``batch_size``. Results stream back to the driver, which writes them to ``out_dir`` as parquet
    shards of ``(index, logits)`` (no Write tasks compete with the actors for CPUs). Returns (N, K) float32
    logits, or with ``features`` the pair (logits, (N, D) float16 penultimate features). With ``views``
    (``(params, k)``: :class:`~orchestrator.stages.teacher_outputs.TeacherPredictor`) the rows are the N x k
    cached views, and every actor reads the images of its view rows itself.
    """
    import ray

    from orchestrator.stages.teacher_outputs import TeacherPredictor, write_outputs

    ensure_ray()
    # image shards, or views: each actor reads (and decodes) the images of its own batches
    by_index = not isinstance(images, np.ndarray) or views is not None
    n = len(views[0]) if views is not None else len(images)
    ds = blocks_dataset(n, max(actors * 4, n // 4096), None if by_index else images)
    out = ds.map_batches(
        TeacherPredictor, fn_constructor_kwargs={"checkpoint": checkpoint, "num_threads": 1, "features": features,
                                                 "images": images if by_index else None, "views": views},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
        num_cpus=1, num_gpus=gpus_per_actor)
    return write_outputs(out.iter_batches(batch_size=None, batch_format="numpy"), out_dir, n, features)
