"""Evaluate a classifier on the test split: top-1, per-class accuracy, confusion matrix (and its PNG)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.data.images import ImageSet
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages.loop import predict


@dataclass
class EvalResult:
    """top1: fraction correct in [0, 1]; per_class: (K,) float64; confusion: (K, K) int64, rows = true."""

    top1: float
    per_class: np.ndarray
    confusion: np.ndarray
    classes: list[str] = field(default_factory=list)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metric dict: ``{prefix}top1`` and ``{prefix}acc_class_<k>``."""
        out = {f"{prefix}top1": self.top1}
        out.update({f"{prefix}acc_class_{k}": float(a) for k, a in enumerate(self.per_class)})
        return out


def score(pred: np.ndarray, labels: np.ndarray, num_classes: int, classes: list[str] | None = None) -> EvalResult:
    """Score predicted classes (N,) int64 against labels (N,) int64."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(conf, (labels, pred), 1)
    per_class = np.diag(conf) / np.maximum(conf.sum(1), 1)
    return EvalResult(float((pred == labels).mean()), per_class, conf, list(classes or []))


def evaluate(model, preprocess: Preprocess, test: ImageSet, num_classes: int, classes: list[str] | None = None,
             batch_size: int = 512, device: str = "cpu") -> EvalResult:
    """Top-1 / per-class / confusion of ``model`` ((B, C, H, W) -> (B, K) logits) on ``test``."""
    model.eval()
    logits = predict(model, preprocess, test.images, batch_size, device)  # (N, K) float32
    return score(logits.argmax(1), test.labels, num_classes, classes)


def plot_confusion(result: EvalResult, path: str | Path, title: str = "") -> Path:
    """Save the row-normalised confusion matrix as a PNG (matplotlib, Agg backend). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(result.confusion)
    norm = result.confusion / np.maximum(result.confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = result.classes or [str(i) for i in range(k)]
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"top-1 {result.top1:.4f}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
