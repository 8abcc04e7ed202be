"""Teacher inference over the transfer set: the adapted teacher's logits (soft labels before temperature).

``TeacherPredictor`` is a callable class over numpy batches; the Ray Data adapter runs it as an actor pool
(each actor holds the teacher once); :func:`teacher_outputs_in_process` writes the same outputs in this process
(passes too small for an actor pool) and :func:`teacher_logits` is the in-process reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from orchestrator.stages.accel import autocast, prepare_model, to_device
from orchestrator.stages.views import render_views, view_rows


class TeacherPredictor:
    """Load a teacher checkpoint once; map batches ``{"image": (B, H, W, C) uint8, "index": (B,) int64}`` to
    ``{"index": (B,) int64, "logits": (B, K) float32}`` (plus ``"features": (B, D) float16``
    with ``features``).

    Args:
        checkpoint: path of a ``kt-model/1`` file with a task head (written after adaptation).
        device: "cuda" when a GPU is visible to this worker, else "cpu".
        num_threads: torch intra-op threads for this worker (CPU).
        images: a lazy :class:`~orchestrator.data.shards.ShardedImages` (or an array): batches may then carry
            only ``index`` and each actor reads and decodes its batch from the image shards.
        views: cached views (:mod:`orchestrator.stages.views`): ``(params, k)``, the (N x k, 7) float32 view
            parameters and the views per image; ``index`` then counts views (row v: view v mod k of image
            v div k of ``images``) and the teacher labels :func:`~orchestrator.stages.views.render_views` of each.
    """

    def __init__(self, checkpoint: str, device: str | None = None, num_threads: int | None = None,
                 features: bool = False, images=None, views: tuple[np.ndarray, int] | None = None):
        from orchestrator.models.teachers import load_model_checkpoint

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = prepare_model(load_model_checkpoint(checkpoint), self.device).eval()  # channels-last on CUDA
        self.features = features
        self.images = images
        self.views = views

    @torch.no_grad()  # not inference_mode: online distillation uses the outputs as targets in a graph
    def outputs(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) uint8 -> ((B, K) logits, (B, D) features), float32 on ``self.device``."""
        x = to_device(self.teacher.preprocess(np.asarray(images)), self.device)  # (B, C, H, W) float32
        with autocast(self.device):  # bf16 (or fp16) on CUDA, a no-op on the CPU (stages/accel.py)
            f = self.teacher.features(x).float()  # (B, D) float32
            return self.teacher.head(f).float(), f

    @torch.no_grad()
    def view_outputs(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) float32 views in [0, 1] -> ((B, K) logits, (B, D) features), float32 on ``self.device``."""
        x = self.teacher.preprocess.from_unit(to_device(views, self.device))  # (B, C', H', W') float32
        with autocast(self.device):
            f = self.teacher.features(x).float()  # (B, D) float32
            return self.teacher.head(f).float(), f

    def __call__(self, batch: dict) -> dict:
        index = np.asarray(batch["index"], np.int64)
        if self.views is not None:
            params, k = self.views
            rows = view_rows(index, k)
            logits, f = self.view_outputs(render_views(np.asarray(self.images[rows]), params[index]))
        else:
            logits, f = self.outputs(batch["image"] if "image" in batch else self.images[index])
        out = {"index": np.asarray(batch["index"], np.int64), "logits": logits.cpu().numpy()}  # (B, K) float32
        if self.features:
            out["features"] = f.half().cpu().numpy()  # (B, D) float16: targets of the feature loss
        return out


def _batches(pred: TeacherPredictor, images: np.ndarray, batch_size: int):
    if pred.views is not None:  # view rows: the predictor reads their images
        n = len(pred.views[0])
        for s in range(0, n, batch_size):
            yield pred({"index": np.arange(s, min(s + batch_size, n))})
        return
    for s in range(0, len(images), batch_size):
        yield pred({"image": images[s:s + batch_size], "index": np.arange(s, min(s + batch_size, len(images)))})


def teacher_logits(checkpoint: str, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """In-process teacher inference. images: (N, H, W, C) uint8 -> (N, K) float32 logits."""
    return np.concatenate([b["logits"] for b in _batches(TeacherPredictor(checkpoint), images, batch_size)])


def teacher_outputs_in_process(checkpoint: str, images: np.ndarray, out_dir: Path, batch_size: int = 512,
                               features: bool = False, views: tuple[np.ndarray, int] | None = None):
    """What the Ray Data adapter's ``teacher_inference`` returns and writes (the same parquet shards of
    ``(index, logits)`` under ``out_dir``), computed in this process: for passes too small to repay an actor
    pool's start-up. Returns (N, K) float32 logits, or with ``features`` (logits, (N, D) float16 features).
    With ``views`` (see :class:`TeacherPredictor`) the rows are the N x k views."""
    pred = TeacherPredictor(checkpoint, features=features, images=images, views=views)
    n = len(views[0]) if views is not None else len(images)
    return write_outputs(_batches(pred, images, batch_size), out_dir, n, features)


def write_outputs(batches, out_dir: Path, n: int, features: bool = False):
    """Predictor batches (``{"index", "logits"[, "features"]}``, any order) of ``n`` images -> the (index,
    logits) parquet shards under ``out_dir`` (:func:`write_shards`) and the outputs in image order: (n, K)
    float32 logits, or with ``features`` (logits, (n, D) float16 features). Raises ValueError (from
    :func:`order_logits`) if any image is missing or repeated."""
    feats: list[np.ndarray] = []

    def logit_batches():  # features stay in memory (float16); the shards hold (index, logits)
        for b in batches:
            if features:
                feats.append(b.pop("features"))
            yield b

    index, logits = write_shards(logit_batches(), out_dir)
    ordered = order_logits(index, logits, n, str(out_dir))
    if not features:
        return ordered
    f = np.empty((n, feats[0].shape[1]), np.float16)  # (n, D) float16
    f[index] = np.concatenate(feats)
    return ordered, f


def order_logits(index: np.ndarray, logits: np.ndarray, n: int, where: str) -> np.ndarray:
    """Place rows by ``index`` ((n,) int64) into (n, K) float32. Raises ValueError if any index is missing or
    repeated."""
    if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
        raise ValueError(f"teacher outputs in {where} hold {len(index)} rows for {n} images")
    out = np.empty((n, logits.shape[1]), np.float32)
    out[index] = logits
    return out


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
