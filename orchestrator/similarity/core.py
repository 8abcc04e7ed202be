"""The similarity-metric registry, its entry type, the shared input checks and :func:`score`.

Every metric scores one source model for one target task from the source's frozen features on the labeled
target images (and, for LEEP/NCE, the source's own classifier logits); higher means "expected to transfer
better" for every metric registered here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from orchestrator.registry import Registry


class SimilarityError(ValueError):
    """A similarity metric cannot score these inputs; the message names the problem and the fix."""


MetricFn = Callable[..., float]


@dataclass(frozen=True)
class SimilarityMetric:
    """One registered metric and its metadata.

    Attributes:
        name: registry name ("logme", "leep", ...).
        fn: ``fn(features, labels, source_logits=None, seed=0) -> float``; ``features`` (N, D) float32,
            ``labels`` (N,) int64 in [0, C), ``source_logits`` (N, K) float32 over the K source classes.
        needs_source_logits: True if ``fn`` needs the source's classifier logits (a source with a head).
        higher_is_better: direction of the score (True for every metric here).
        reference: the paper the formula comes from.
    """

    name: str
    fn: MetricFn
    needs_source_logits: bool
    higher_is_better: bool = True
    reference: str = ""

    def __call__(self, features, labels, source_logits=None, seed: int = 0) -> float:
        return self.fn(features, labels, source_logits=source_logits, seed=seed)


SIMILARITY: Registry[SimilarityMetric] = Registry("similarity metric")


def register_metric(name: str, *, needs_source_logits: bool, reference: str,
                    higher_is_better: bool = True) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering ``fn`` in :data:`SIMILARITY` as a :class:`SimilarityMetric`; returns ``fn``
    unchanged. Raises ValueError on a duplicate name."""

    def deco(fn: MetricFn) -> MetricFn:
        entry = SimilarityMetric(name, fn, needs_source_logits, higher_is_better, reference)
        SIMILARITY.register(name)(entry)
        return fn

    return deco


def feature_only_metrics() -> list[str]:
    """Names of the registered metrics that need only features (usable for a source without a head)."""
    return [n for n in SIMILARITY.names() if not SIMILARITY.get(n).needs_source_logits]


def missing_logits_error(metric: str, source: str | None = None) -> SimilarityError:
    """The error for a logits-based metric called without logits; it lists the feature-only metrics."""
    who = f"source {source!r}" if source else "this source"
    return SimilarityError(f"metric {metric!r} needs the source's classifier logits; {who} has no head: "
                           f"use {'/'.join(feature_only_metrics())}")


def check_features(features, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert one (features, labels) pair.

    Args:
        features: (N, D) float array, finite, not constant.
        labels: (N,) integer array, values >= 0; at least 2 distinct classes, each with at least 2 images.

    Returns:
        (features as (N, D) float64, labels remapped to (N,) int64 in [0, C'), classes (C',) int64 — the
        original label values present, sorted). Classes absent from ``labels`` are ignored.

    Raises:
        SimilarityError: wrong shapes, mismatched N, non-integer or negative labels, non-finite or constant
            features, fewer than 2 classes, a class with fewer than 2 images.
    """
    f = np.asarray(features)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise SimilarityError(f"features must be a non-empty (N, D) array, got shape {f.shape}")
    if y.ndim != 1:
        raise SimilarityError(f"labels must be a (N,) array, got shape {y.shape}")
    if f.shape[0] != y.shape[0]:
        raise SimilarityError(f"features have N={f.shape[0]} rows but labels have N={y.shape[0]}: "
                              "pass the features and labels of the same images, in the same order")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise SimilarityError(f"labels must be non-negative integers (int64 class indices), got {y.dtype}")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f)).any(axis=1).sum())
        raise SimilarityError(f"features contain NaN/inf in {bad} of {f.shape[0]} rows: "
                              "check the source model's forward pass (overflow, bad checkpoint)")
    if np.ptp(f, axis=0).max() == 0:
        raise SimilarityError("features are constant across all images (degenerate source model or a "
                              "broken feature extractor): no metric can rank it")
    classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    if classes.size < 2:
        raise SimilarityError(f"labels hold {classes.size} class(es); similarity metrics need at least 2: "
                              "label more classes of the target task")
    if counts.min() < 2:
        small = ", ".join(str(int(c)) for c in classes[counts < 2])
        raise SimilarityError(f"class(es) {small} have fewer than 2 labeled images; every class needs at "
                              "least 2: label more images or drop those classes")
    return f, y_idx.astype(np.int64), classes.astype(np.int64)


def check_logits(source_logits, n: int, metric: str) -> np.ndarray:
    """Validate the source's classifier logits: (N, K) finite floats, same N as the features.

    Returns (N, K) float64. Raises SimilarityError (missing logits, wrong shape, mismatched N, non-finite)."""
    if source_logits is None:
        raise missing_logits_error(metric)
    z = np.asarray(source_logits)
    if z.ndim != 2 or z.shape[1] == 0:
        raise SimilarityError(f"source_logits must be an (N, K) array, got shape {z.shape}")
    if z.shape[0] != n:
        raise SimilarityError(f"source_logits have N={z.shape[0]} rows but labels have N={n}: "
                              "pass the logits of the same images, in the same order")
    z = z.astype(np.float64)
    if not np.isfinite(z).all():
        raise SimilarityError("source_logits contain NaN/inf: check the source model's classifier head")
    return z


def finite_score(value: float, metric: str) -> float:
    """Return ``value`` as a float; raises SimilarityError if it is NaN/inf (degenerate features)."""
    v = float(value)
    if not np.isfinite(v):
        raise SimilarityError(f"metric {metric!r} came out non-finite ({v}): the features are degenerate "
                              "(near-constant, rank-deficient or overflowing); check the source model "
                              "or use another metric")
    return v


def score(metric: str, features, labels, source_logits=None, *, seed: int = 0,
          source: str | None = None) -> float:
    """Score one source with the registered metric ``metric``.

    Args:
        metric: a name in :data:`SIMILARITY`.
        features: (N, D) float32, the source's frozen features on the labeled target images.
        labels: (N,) int64 target labels in [0, C).
        source_logits: (N, K) float32 source-classifier logits, or None for a source without a head.
        seed: seed for the metrics that shuffle (cross-validation folds).
        source: the source's name, used in error messages only.

    Returns:
        The score (float, higher is better).

    Raises:
        UnknownNameError: no such metric (lists valid names).
        SimilarityError: a logits-based metric without logits (names ``source`` and the alternatives), or any
            input problem :func:`check_features` / :func:`check_logits` report.
    """
    entry = SIMILARITY.get(metric)
    if entry.needs_source_logits and source_logits is None:
        raise missing_logits_error(metric, source)
    return entry(features, labels, source_logits=source_logits, seed=seed)
