"""Teacher inference over the transfer set: the adapted teacher's logits (soft labels before temperature).

``TeacherPredictor`` is a callable class over numpy batches; the Ray Data adapter runs it as an actor pool
(each actor holds the teacher once), and :func:`teacher_logits` runs it in-process (the reference path).
"""
from __future__ import annotations

import numpy as np
import torch


class TeacherPredictor:
    """Load a teacher checkpoint once; map batches ``{"image": (B, H, W, C) uint8, "index": (B,) int64}`` to
    ``{"index": (B,) int64, "logits": (B, K) float32}`` (plus ``"features": (B, D) float16``
    with ``features``).

    Args:
        checkpoint: path of a ``kt-model/1`` file with a task head (written after adaptation).
        device: "cuda" when a GPU is visible to this worker, else "cpu".
        num_threads: torch intra-op threads for this worker (CPU).
    """

    def __init__(self, checkpoint: str, device: str | None = None, num_threads: int | None = None,
                 features: bool = False):
        from orchestrator.models.teachers import load_model_checkpoint

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = load_model_checkpoint(checkpoint).to(self.device).eval()
        self.features = features

    @torch.no_grad()  # not inference_mode: online distillation uses the outputs as targets in a graph
    def outputs(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) uint8 -> ((B, K) logits, (B, D) features), float32 on ``self.device``."""
        f = self.teacher.features(self.teacher.preprocess(np.asarray(images)).to(self.device)).float()
        return self.teacher.head(f).float(), f

    def __call__(self, batch: dict) -> dict:
        logits, f = self.outputs(batch["image"])
        out = {"index": np.asarray(batch["index"], np.int64), "logits": logits.cpu().numpy()}  # (B, K) float32
        if self.features:
            out["features"] = f.half().cpu().numpy()  # (B, D) float16: targets of the feature loss
        return out


def teacher_logits(checkpoint: str, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """In-process teacher inference. images: (N, H, W, C) uint8 -> (N, K) float32 logits."""
    pred = TeacherPredictor(checkpoint)
    outs = [pred({"image": images[s:s + batch_size], "index": np.arange(s, min(s + batch_size, len(images)))})
            ["logits"] for s in range(0, len(images), batch_size)]
    return np.concatenate(outs)
