"""Stratified, seeded labeled/unlabeled splits, saved as a split file so runs compare."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.data.errors import SplitError


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


def stratified_holdout(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Pick about ``n`` indices, each class in proportion to its share of ``labels`` (at least 1 and at most
    all but 1 image per class), with ``np.random.default_rng(seed)``; returns sorted (M,) int64."""
    classes, counts = np.unique(labels, return_counts=True)
    per = {int(c): min(int(k) - 1, max(1, int(round(n * k / len(labels))))) for c, k in zip(classes, counts)}
    return stratified_pick(labels, per, np.random.default_rng(seed))


def _check_counts(counts: np.ndarray, want: dict[int, int], val: int, classes: list[str] | None,
                  asked: str) -> None:
    """Raise SplitError for the first class with fewer than ``want[c] + val`` images.

    counts: (K,) int64 images per class index; asked: the setting that chose ``want`` (``labels.per_class``
    or ``labels.label_fraction``), named in the fix."""
    for c, n in sorted(want.items()):
        have = int(counts[c])
        if have >= n + val:
            continue
        name = f"class {classes[c]!r} (index {c})" if classes and c < len(classes) else f"class index {c}"
        if have == 0:
            raise SplitError(f"{name} has no train images. Fix: add images of that class to the train split")
        need = f"{n + val} ({n} labeled + {val} validation)" if val else str(n)
        lower = f"{asked} or labels.val_per_class" if val else asked
        raise SplitError(f"{name} has {have} train images but the split takes {need} of it. "
                         f"Fix: lower {lower}, or add images of that class")


def make_split(labels: np.ndarray, label_fraction: float | None = None, per_class: int | None = None,
               seed: int = 0, val_per_class: int | None = None, classes: list[str] | None = None) -> Split:
    """Choose a stratified labeled subset of a train split.

    Args:
        labels: (N,) int64 train labels.
        label_fraction: fraction in (0, 1] of each class to label (at least 1 image per class).
        per_class: or exactly this many images per class.
        seed: the split's RNG seed.
        val_per_class: also hold out this many images per class from the remainder as a labeled validation
            subset (drawn after the labeled subset, so the labeled subset does not depend on it).
        classes: the task's class names (index = label); when given, every one of them must have enough train
            images (a class with none is an error too) and errors name the class.

    Raises:
        ValueError: neither or an out-of-range amount given.
        SplitError: (a ValueError and a DataError) a class has fewer train images than the labeled (+ validation)
            subset takes from it; names the class, both counts and the fix.
    """
    counts = np.bincount(labels, minlength=len(classes or ()))  # (K,) int64 train images per class index
    present = range(len(counts)) if classes else np.flatnonzero(counts)
    if per_class is not None:
        want, asked = {int(c): int(per_class) for c in present}, "labels.per_class"
    elif label_fraction is not None and 0 < label_fraction <= 1:
        want = {int(c): max(1, int(round(counts[c] * label_fraction))) for c in present}
        asked = "labels.label_fraction"
    else:
        raise ValueError(f"label_fraction must be in (0, 1] or per_class > 0, got {label_fraction}, {per_class}")
    _check_counts(counts, want, int(val_per_class or 0), classes, asked)
    labeled = stratified_pick(labels, want, np.random.default_rng(seed))
    rest = np.setdiff1d(np.arange(len(labels)), labeled).astype(np.int64)
    val = np.zeros(0, np.int64)
    if val_per_class:
        want_val = {c: int(val_per_class) for c in want}
        val = rest[stratified_pick(labels[rest], want_val, np.random.default_rng([seed, 1]))]
        rest = np.setdiff1d(rest, val).astype(np.int64)
    return Split(labeled, rest, seed, val)
