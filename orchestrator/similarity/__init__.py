"""Task-similarity / transferability metrics (LogME, LEEP, NCE, H-score, GBC, kNN, linear probe), a registry.
Imports: registry only.

Borup et al., ICCV 2023 (arXiv 2304.12314), "Distilling from Similar Tasks for Transfer Learning on a
Budget": score each source model on the labeled target images with a task-similarity metric, then distill
from the best one (DistillSingle) or from several weighted by their scores (DistillWeighted).

Registered metrics (``SIMILARITY.names()``): ``logme``, ``hscore``, ``gbc``, ``knn``, ``linear_probe``
(features only) and ``leep``, ``nce`` (also need the source's classifier logits). Score with
``score("logme", features, labels)`` or ``SIMILARITY.get("logme")(features, labels)``.
Importing this package imports numpy only; scikit-learn and scipy load inside the functions that use them.
"""
from __future__ import annotations

from orchestrator.similarity.core import (
    SIMILARITY,
    SimilarityError,
    SimilarityMetric,
    feature_only_metrics,
    score,
)
from orchestrator.similarity.metrics import gbc, hscore, knn, leep, linear_probe, logme, nce  # registers them
from orchestrator.similarity.ranking import rank_correlations, weights_from_scores

__all__ = [
    "SIMILARITY", "SimilarityError", "SimilarityMetric", "feature_only_metrics", "score",
    "gbc", "hscore", "knn", "leep", "linear_probe", "logme", "nce",
    "rank_correlations", "weights_from_scores",
]
