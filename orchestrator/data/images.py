"""In-memory image sets: uint8 arrays with labels, the unit every stage takes and returns."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class ImageSet:
    """Images with optional labels.

    Attributes:
        images: (N, H, W, C) uint8, C in {1, 3}.
        labels: (N,) int64 class indices, or None for unlabeled images.
    """

    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        if self.images.ndim == 3:
            self.images = self.images[..., None]  # (N, H, W) -> (N, H, W, 1)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, C) uint8, got {self.images.shape} {self.images.dtype}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.labels) != len(self.images):
                raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        """The images (and labels) at ``idx`` ((M,) int64)."""
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx])

    def content_hash(self) -> str:
        """16-hex-digit SHA-256 over shape, pixels and labels: the cache key of this set's content."""
        h = hashlib.sha256(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).data)
        if self.labels is not None:
            h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


@dataclass
class TaskData:
    """A target task: train split (labeled subset and unlabeled remainder come from it), test split, classes."""

    train: ImageSet
    test: ImageSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def pixel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the train images, on the [0, 1] scale."""
        x = self.train.images[:10_000].astype(np.float32) / 255.0  # (n, H, W, C) float32
        return x.mean(axis=(0, 1, 2)).tolist(), (x.std(axis=(0, 1, 2)) + 1e-6).tolist()
