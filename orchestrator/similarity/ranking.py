"""Use similarity scores across sources: how well a metric ranks them (against measured transfer accuracy),
and the per-source weights of DistillWeighted (Borup et al., ICCV 2023, arXiv 2304.12314, Sec. 3).

``scores`` is ``{source name: metric score}`` for one metric (higher is better); ``accuracy`` is
``{source name: measured target accuracy}`` in any units (fraction or percent; regret comes back in the same).
Ties in a top pick are broken by source name (sorted), so results are deterministic.
"""
from __future__ import annotations

import math

import numpy as np

from orchestrator.similarity.core import SimilarityError

WEIGHT_MODES = ("softmax", "normalized")


def _check_scores(scores: dict[str, float], what: str = "scores") -> tuple[list[str], np.ndarray]:
    """Sorted names and their (S,) float64 values; raises SimilarityError (< 2 sources, non-finite)."""
    if len(scores) < 2:
        raise SimilarityError(f"{what} cover {len(scores)} source(s); ranking or weighting needs at least 2")
    names = sorted(scores)
    vals = np.array([float(scores[n]) for n in names], dtype=np.float64)
    bad = [n for n, v in zip(names, vals) if not math.isfinite(v)]
    if bad:
        raise SimilarityError(f"{what} of source(s) {', '.join(bad)} are not finite: "
                              "drop those sources or fix the metric")
    return names, vals


def _order(names: list[str], vals: np.ndarray) -> list[str]:
    """Names by descending value, ties by name."""
    return [names[i] for i in sorted(range(len(names)), key=lambda i: (-vals[i], names[i]))]


def rank_correlations(scores: dict[str, float], accuracy: dict[str, float]) -> dict:
    """How well a metric's scores rank the sources by their measured transfer accuracy.

    Args:
        scores: {source: score}, higher = predicted better; at least 2 sources, finite.
        accuracy: {source: measured accuracy}; exactly the same sources as ``scores``, finite.

    Returns:
        ``{"kendall_tau": float, "spearman_rho": float, "top1_regret": float, "top_pick": str,
        "best_source": str, "n_sources": int}``. Kendall's tau-b and Spearman's rho are from scipy.stats (ties
        handled); they are NaN where either side is constant (rank correlation undefined). ``top1_regret`` =
        accuracy of the best source - accuracy of the metric's top pick (>= 0, in the units of ``accuracy``).

    Raises:
        SimilarityError: the two dicts name different sources, fewer than 2 sources, non-finite values.
    """
    if set(scores) != set(accuracy):
        raise SimilarityError(
            "scores and accuracy must name the same sources; "
            f"only in scores: {sorted(set(scores) - set(accuracy))}, "
            f"only in accuracy: {sorted(set(accuracy) - set(scores))}")
    names, s = _check_scores(scores)
    _, a = _check_scores(accuracy, "accuracies")
    tau, rho = _correlations(s, a)
    pick = _order(names, s)[0]
    best = _order(names, a)[0]
    return {"kendall_tau": tau, "spearman_rho": rho, "top1_regret": float(accuracy[best] - accuracy[pick]),
            "top_pick": pick, "best_source": best, "n_sources": len(names)}


def _correlations(s: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    """(Kendall tau-b, Spearman rho) of two (S,) arrays; NaN where either is constant."""
    if np.ptp(s) == 0 or np.ptp(a) == 0:
        return float("nan"), float("nan")
    from scipy.stats import kendalltau, spearmanr

    return float(kendalltau(s, a).statistic), float(spearmanr(s, a).statistic)


def weights_from_scores(scores: dict[str, float], mode: str = "softmax", temperature: float = 1.0,
                        top_k: int | None = None) -> dict[str, float]:
    """Per-source distillation weights for DistillWeighted (Borup et al., ICCV 2023) from one metric's scores.

    The ``top_k`` best-scored sources are kept (all if None or >= the number of sources; ties by name); the
    returned dict holds only those, by descending weight, and its weights sum to 1.

    - ``"softmax"``: ``w_s = exp(z_s / T) / sum_{s' in top-k} exp(z_s' / T)`` with ``z`` the z-scored scores
      ``(score - mean) / std`` over *all* given sources. Z-scoring makes T mean the same thing for every
      metric: raw metrics live on very different scales (LogME ~ nats per sample, GBC in [-C(C-1), 0], kNN in
      [0, 1]), so a raw softmax would be near-uniform for one metric and one-hot for another. T -> 0 puts all
      weight on the best source; T -> inf gives uniform weights. All-equal scores give uniform weights.
    - ``"normalized"``: min-max normalise over all given sources, ``(score - min) / (max - min)``, keep the
      top-k, divide by their sum (``temperature`` unused). The worst source gets 0 if kept; all-equal (or
      all-zero kept) scores give uniform weights.

    Args:
        scores: {source: score}, higher = better; at least 2 sources, all finite.
        mode: "softmax" or "normalized".
        temperature: T > 0 (softmax only, but always validated).
        top_k: number of sources to keep, >= 1, or None for all.

    Returns:
        {source: weight}, weights in [0, 1] summing to 1.

    Raises:
        SimilarityError: fewer than 2 sources, non-finite scores, unknown mode, temperature <= 0, top_k < 1.
    """
    names, vals = _check_scores(scores)
    if mode not in WEIGHT_MODES:
        raise SimilarityError(f"unknown weight mode {mode!r}; valid choices: {', '.join(WEIGHT_MODES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise SimilarityError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise SimilarityError(f"top_k must be >= 1 (or None for all sources), got {top_k}")
    keep = _order(names, vals)[: top_k or len(names)]
    idx = np.array([names.index(n) for n in keep])
    w = _softmax_weights(vals, idx, temperature) if mode == "softmax" else _minmax_weights(vals, idx)
    return dict(zip(keep, (float(x) for x in w)))


def _softmax_weights(vals: np.ndarray, idx: np.ndarray, temperature: float) -> np.ndarray:
    std = vals.std()
    z = (vals - vals.mean()) / std if std > 0 else np.zeros_like(vals)
    logits = z[idx] / temperature
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _minmax_weights(vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    span = np.ptp(vals)
    norm = (vals[idx] - vals.min()) / span if span > 0 else np.ones(idx.size)
    total = norm.sum()
    return norm / total if total > 0 else np.full(idx.size, 1.0 / idx.size)
