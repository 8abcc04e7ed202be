"""Image sets: uint8 images (an array in memory, or a lazy view over image shards) with labels, the unit every
stage takes and returns."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from orchestrator.data.shards import decode_limit, take

SMALL_SUBSET_BYTES = 64 << 20  # a lazy set's subset up to this size is decoded once (ImageSet.subset)


@dataclass
class ImageSet:
    """Images with optional labels.

    Attributes:
        images: (N, H, W, C) uint8, C in {1, 3}: an array, or a lazy
            :class:`~orchestrator.data.shards.ShardedImages` (indexing a batch decodes it; see that module).
        labels: (N,) int64 class indices, or None for unlabeled images.
    """

    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        if self.lazy:
            return self._check_labels()
        if self.images.ndim == 3:
            self.images = self.images[..., None]  # (N, H, W) -> (N, H, W, 1)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, C) uint8, got {self.images.shape} {self.images.dtype}")
        self._check_labels()

    @property
    def lazy(self) -> bool:
        """Whether the images are a lazy view over image shards (not an array)."""
        return not isinstance(self.images, np.ndarray)

    def _check_labels(self) -> None:
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.labels) != len(self.images):
                raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        """The images (and labels) at ``idx`` ((M,) int64). A lazy set's subset is a lazy view, decoded into
        memory once when it is small (at most :data:`SMALL_SUBSET_BYTES`, the loader's ``data.in_memory_max_mb``
        and the decode limit: a labeled subset that every epoch reads again)."""
        images = take(self.images, idx)
        if self.lazy and images.nbytes <= min(SMALL_SUBSET_BYTES, images.in_memory_max_bytes, decode_limit()):
            images = images.materialize()
        return ImageSet(images, None if self.labels is None else self.labels[idx])

    def content_hash(self) -> str:
        """16-hex-digit SHA-256 over shape, pixels and labels: the cache key of this set's content (a lazy set:
        over its image shards' key and rows, without decoding)."""
        if self.lazy:
            h = hashlib.sha256(self.images.content_hash().encode())
            if self.labels is not None:
                h.update(self.labels.tobytes())
            return h.hexdigest()[:16]
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
        """Per-channel mean and std of the first 10,000 train images, on the [0, 1] scale (a lazy set: decoded
        and accumulated batch by batch)."""
        if not self.train.lazy:
            x = self.train.images[:10_000].astype(np.float32) / 255.0  # (n, H, W, C) float32
            return x.mean(axis=(0, 1, 2)).tolist(), (x.std(axis=(0, 1, 2)) + 1e-6).tolist()
        s = s2 = n = 0.0
        for b in self.train.images.view(slice(0, 10_000)).iter_batches(1000):
            x = b.astype(np.float64) / 255.0  # (b, H, W, C) float64
            s, s2, n = s + x.sum(axis=(0, 1, 2)), s2 + (x * x).sum(axis=(0, 1, 2)), n + x[..., 0].size
        mean = s / n
        return mean.tolist(), (np.sqrt(np.maximum(s2 / n - mean * mean, 0)) + 1e-6).tolist()
