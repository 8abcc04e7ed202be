"""Stratified, seeded labeled/unlabeled splits, saved as a split file so runs compare."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Split:
    """Indices into the train split.

    Attributes:
        labeled: (L,) int64 sorted indices of the labeled subset.
        unlabeled: (U,) int64 sorted indices of the remainder (labels hidden from every stage).
        val: (V,) int64 sorted indices of a held-out labeled validation subset, disjoint from both (model
            selection in sweeps only; never trained on, never in a transfer set); empty when not asked for.
    """

    labeled: np.ndarray
    unlabeled: np.ndarray
    seed: int
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def key(self) -> str:
        """16-hex-digit hash of the labeled indices."""
        return hashlib.sha256(self.labeled.tobytes()).hexdigest()[:16]

    def without_labels(self) -> np.ndarray:
        """(U + V,) int64 sorted: every train index except the labeled subset (what label-free stages such as
        the stand-in's self-supervised pretraining may use; independent of the validation hold-out)."""
        return np.union1d(self.unlabeled, self.val).astype(np.int64)

    def save(self, path: str | Path) -> Path:
        """Write the split as JSON (atomically). Returns the path."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seed": self.seed, "labeled": self.labeled.tolist(), "val": self.val.tolist(),
                                   "num_unlabeled": int(len(self.unlabeled))}))
        tmp.replace(path)
        return path


def stratified_pick(labels: np.ndarray, per_class: dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """Pick ``per_class[c]`` random indices of each class ``c``; returns sorted (M,) int64."""
    out = []
    for c, n in sorted(per_class.items()):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def make_split(labels: np.ndarray, label_fraction: float | None = None, per_class: int | None = None,
               seed: int = 0, val_per_class: int | None = None) -> Split:
    """Choose a stratified labeled subset of a train split.

    Args:
        labels: (N,) int64 train labels.
        label_fraction: fraction in (0, 1] of each class to label (at least 1 image per class).
        per_class: or exactly this many images per class.
        seed: the split's RNG seed.
        val_per_class: also hold out this many images per class from the remainder as a labeled validation
            subset (drawn after the labeled subset, so the labeled subset does not depend on it).

    Raises:
        ValueError: neither or an out-of-range amount given.
    """
    classes, counts = np.unique(labels, return_counts=True)
    if per_class is not None:
        want = {int(c): int(per_class) for c in classes}
    elif label_fraction is not None and 0 < label_fraction <= 1:
        want = {int(c): max(1, int(round(n * label_fraction))) for c, n in zip(classes, counts)}
    else:
        raise ValueError(f"label_fraction must be in (0, 1] or per_class > 0, got {label_fraction}, {per_class}")
    labeled = stratified_pick(labels, want, np.random.default_rng(seed))
    rest = np.setdiff1d(np.arange(len(labels)), labeled).astype(np.int64)
    val = np.zeros(0, np.int64)
    if val_per_class:
        want_val = {int(c): int(val_per_class) for c in classes}
        val = rest[stratified_pick(labels[rest], want_val, np.random.default_rng([seed, 1]))]
        rest = np.setdiff1d(rest, val).astype(np.int64)
    return Split(labeled, rest, seed, val)
