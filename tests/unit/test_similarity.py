"""Task-similarity metrics (orchestrator/similarity): each metric against an independent plain-numpy
computation on small data, the cross-validated probes on separable vs random features, every input error,
and the ranking / DistillWeighted weight helpers on hand examples."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from orchestrator.registry import UnknownNameError
from orchestrator.similarity import (
    SIMILARITY,
    SimilarityError,
    gbc,
    hscore,
    knn,
    leep,
    linear_probe,
    logme,
    nce,
    rank_correlations,
    score,
    weights_from_scores,
)
from orchestrator.similarity.core import finite_score
from orchestrator.similarity.metrics import logme_fit

FEATURE_ONLY = ["gbc", "hscore", "knn", "linear_probe", "logme"]


@pytest.fixture(autouse=True)
def one_blas_thread():
    """These problems are tiny: BLAS/OpenMP threads only add contention on shared cores (lbfgs 10x slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def blobs(n_per: int, n_cls: int, dim: int, sep: float, seed: int = 0):
    """Gaussian class blobs: (N, dim) float32 features, (N,) int64 labels; ``sep`` scales the class means."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_cls), n_per).astype(np.int64)
    centres = rng.normal(size=(n_cls, dim)) * sep
    return (centres[y] + rng.normal(size=(y.size, dim))).astype(np.float32), y


# ------------------------------------------------------------------------------------------------ registry
def test_registry_holds_every_metric_with_metadata():
    assert SIMILARITY.names() == ["gbc", "hscore", "knn", "leep", "linear_probe", "logme", "nce"]
    for name in SIMILARITY.names():
        m = SIMILARITY.get(name)
        assert m.name == name and m.higher_is_better and m.reference
        assert m.needs_source_logits == (name in ("leep", "nce"))
    with pytest.raises(UnknownNameError, match="unknown similarity metric 'logmee'; valid choices: gbc, hs"):
        SIMILARITY.get("logmee")


def test_package_import_is_light():
    code = ("import sys, orchestrator.similarity; "
            "print(sorted(m for m in ('sklearn', 'scipy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------- LEEP, NCE
Y6 = np.array([0, 0, 0, 1, 1, 1])
LOGITS6 = np.array([[2.0, 0.0, -1.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0],
                    [-1.0, 1.0, 1.0], [0.0, 0.5, 2.0], [0.0, 0.0, 3.0]], dtype=np.float32)
F6 = np.arange(12, dtype=np.float32).reshape(6, 2) ** 1.5


def test_leep_matches_loop_computation():
    theta = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in LOGITS6.tolist()]
    joint = [[sum(theta[i][z] for i in range(6) if Y6[i] == y) / 6 for z in range(3)] for y in range(2)]
    cond = [[joint[y][z] / (joint[0][z] + joint[1][z]) for z in range(3)] for y in range(2)]
    expected = sum(math.log(sum(cond[Y6[i]][z] * theta[i][z] for z in range(3))) for i in range(6)) / 6
    assert leep(F6, Y6, LOGITS6) == pytest.approx(expected, rel=1e-9)
    assert -math.log(2) < expected < 0  # better than chance on this example


def test_nce_matches_hand_value():
    # argmax z = [0, 0, 1, 1, 2, 2] (ties -> lowest index); joint: (0,0)=2/6 (0,1)=1/6 (1,1)=1/6 (1,2)=2/6
    # H(Y|Z) = -[2/6 log(2/2) + 1/6 log(1/2) + 1/6 log(1/2) + 2/6 log(2/2)] = (1/3) log 2
    assert nce(F6, Y6, LOGITS6) == pytest.approx(-math.log(2) / 3, rel=1e-12)
    assert nce(F6, Y6, np.eye(2, 3)[Y6] * 5) == pytest.approx(0.0, abs=1e-12)  # Z determines Y


def test_leep_tends_to_nce_for_hard_source_predictions():
    # theta becomes one-hot: LEEP = sum P(y,z) log P(y|z) = -H(Y|Z)
    hard = np.eye(3)[[0, 1, 1, 2, 2, 2]] * 100.0
    assert leep(F6, Y6, hard) == pytest.approx(nce(F6, Y6, hard), abs=1e-9)


# ------------------------------------------------------------------------------------------------- H-score
def test_hscore_matches_direct_formula():
    f, y = blobs(30, 3, 4, sep=1.5)
    f64 = f.astype(np.float64)
    class_mean = np.stack([f64[y == c].mean(axis=0) for c in range(3)])[y]
    expected = np.trace(np.linalg.inv(np.cov(f64, rowvar=False)) @ np.cov(class_mean, rowvar=False))
    assert hscore(f, y) == pytest.approx(expected, rel=1e-8)
    assert 0 < expected < 2  # bounded by C - 1
    assert hscore(*blobs(30, 3, 4, sep=3.0)) > hscore(*blobs(30, 3, 4, sep=0.1))


# ----------------------------------------------------------------------------------------------------- GBC
def test_gbc_matches_1d_bhattacharyya_by_hand():
    # class 0: mean 1, var 1; class 1: mean 5, var 4 (maximum-likelihood variances)
    f = np.array([[0.0], [2.0], [3.0], [7.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    db = 0.25 * (1 - 5) ** 2 / (1 + 4) + 0.5 * math.log((1 + 4) / (2 * math.sqrt(1 * 4)))
    assert gbc(f, y) == pytest.approx(-2 * math.exp(-db), rel=1e-10)


def test_gbc_reduces_wide_features_with_pca_to_64_dims():
    f, y = blobs(25, 4, 80, sep=0.3)
    centred = f.astype(np.float64) - f.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov(centred, rowvar=False))  # principal axes, ascending variance
    reduced = centred @ vecs[:, ::-1][:, :64]
    assert gbc(f, y) == pytest.approx(gbc(reduced, y), rel=1e-6)
    assert -12 <= gbc(f, y) <= 0  # -C(C-1) <= GBC <= 0


def test_gbc_prefers_separated_classes():
    assert gbc(*blobs(20, 3, 8, sep=4.0)) > gbc(*blobs(20, 3, 8, sep=0.2))


# --------------------------------------------------------------------------------------------------- LogME
def direct_log_evidence(f: np.ndarray, t: np.ndarray, alpha: float, beta: float) -> float:
    """log N(t; 0, beta^-1 I + alpha^-1 F F^T) / N: the evidence written as a Gaussian marginal."""
    n = t.size
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + t @ np.linalg.solve(cov, t)) / n)


@pytest.mark.parametrize("n_per,dim", [(12, 5), (5, 40)])  # N > D and D > N
def test_logme_maximises_the_gaussian_marginal_evidence(n_per, dim):
    from scipy.optimize import minimize

    f, y = blobs(n_per, 3, dim, sep=1.0)
    f64 = f.astype(np.float64)
    best = []
    for c in range(3):
        t = (y == c).astype(np.float64)
        alpha, beta, ev = logme_fit(f64, t)
        assert ev == pytest.approx(direct_log_evidence(f64, t, alpha, beta), abs=1e-6)
        res = minimize(lambda p: -direct_log_evidence(f64, t, math.exp(p[0]), math.exp(p[1])), [0.0, 0.0],
                       method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000})
        assert ev >= -res.fun - 1e-5  # the fixed point reaches the maximum found by a generic optimiser
        best.append(-res.fun)
    assert logme(f, y) == pytest.approx(np.mean(best), abs=1e-5)


def test_logme_ranks_separable_above_random_and_ignores_sample_order():
    sep_f, y = blobs(20, 4, 16, sep=3.0)
    rand_f = np.random.default_rng(1).normal(size=sep_f.shape).astype(np.float32)
    assert logme(sep_f, y) > logme(rand_f, y) + 0.2
    perm = np.random.default_rng(2).permutation(y.size)
    assert logme(sep_f[perm], y[perm]) == pytest.approx(logme(sep_f, y), rel=1e-9)


# ---------------------------------------------------------------------------------- cross-validated probes
@pytest.mark.parametrize("metric", [knn, linear_probe])
def test_probes_separate_separable_from_random_features(metric):
    sep_f, y = blobs(15, 4, 16, sep=3.0)
    rand_f = np.random.default_rng(3).normal(size=sep_f.shape).astype(np.float32)
    assert metric(sep_f, y) >= 0.95
    assert metric(rand_f, y) <= 0.6  # chance is 0.25
    assert metric(sep_f, y, seed=7) == metric(sep_f, y, seed=7)


def test_probes_use_folds_up_to_the_smallest_class():
    from orchestrator.similarity.metrics import _folds

    f, y = blobs(10, 2, 6, sep=3.0)
    keep = np.r_[np.arange(10), 10, 11]  # class 1 has only 2 images -> 2 folds, 1 training image of it each
    assert len(list(_folds(y[keep], seed=0))) == 2 and len(list(_folds(y, seed=0))) == 5
    assert linear_probe(f[keep], y[keep]) == 1.0
    # 5 uniform votes outvote a class with one training image: kNN gets exactly the 10 majority images right
    assert knn(f[keep], y[keep]) == pytest.approx(10 / 12)


def test_every_metric_through_score():
    f, y = blobs(10, 3, 8, sep=2.0)
    logits = np.random.default_rng(4).normal(size=(y.size, 5)).astype(np.float32)
    for name in SIMILARITY.names():
        assert math.isfinite(score(name, f, y, logits, seed=1))


# ------------------------------------------------------------------------------------------------- errors
def test_logits_metric_without_logits_names_source_and_alternatives():
    with pytest.raises(SimilarityError, match=r"metric 'leep' needs the source's classifier logits; source "
                       r"'dino' has no head: use gbc/hscore/knn/linear_probe/logme"):
        score("leep", F6, Y6, source="dino")
    with pytest.raises(SimilarityError, match="'nce' needs the source's classifier logits"):
        nce(F6, Y6)


@pytest.mark.parametrize("metric", FEATURE_ONLY + ["leep", "nce"])
def test_input_errors(metric):
    fn = SIMILARITY.get(metric)
    f, y = blobs(4, 2, 3, sep=1.0)
    logits = np.zeros((8, 3), np.float32)
    bad = f.copy()
    bad[2, 1] = np.nan
    with pytest.raises(SimilarityError, match="NaN/inf in 1 of 8 rows"):
        fn(bad, y, logits)
    with pytest.raises(SimilarityError, match="features are constant"):
        fn(np.ones_like(f), y, logits)
    with pytest.raises(SimilarityError, match="1 class.*at least 2"):
        fn(f, np.zeros(8, np.int64), logits)
    with pytest.raises(SimilarityError, match="class.*3 have fewer than 2 labeled images"):
        fn(f, np.r_[y[:-1], 3], logits)
    with pytest.raises(SimilarityError, match="features have N=8 rows but labels have N=7"):
        fn(f, y[:7], logits)
    with pytest.raises(SimilarityError, match="non-negative integers"):
        fn(f, y.astype(np.float32), logits)


@pytest.mark.parametrize("metric", ["leep", "nce"])
def test_logit_errors(metric):
    f, y = blobs(4, 2, 3, sep=1.0)
    with pytest.raises(SimilarityError, match="source_logits have N=7 rows but labels have N=8"):
        score(metric, f, y, np.zeros((7, 3)))
    with pytest.raises(SimilarityError, match="source_logits contain NaN/inf"):
        score(metric, f, y, np.full((8, 3), np.inf))


@pytest.mark.parametrize("metric", ["logme", "hscore", "gbc"])
def test_overflowing_features_give_a_non_finite_score_error(metric):
    f, y = blobs(5, 2, 3, sep=1.0)
    with pytest.raises(SimilarityError, match=f"metric '{metric}' came out non-finite"):
        score(metric, f.astype(np.float64) * 1e300, y)
    with pytest.raises(SimilarityError, match="came out non-finite"):
        finite_score(float("nan"), metric)


# ---------------------------------------------------------------------------------------------- ranking
def test_rank_correlations_on_a_hand_example():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    acc = {"a": 0.7, "b": 0.9, "c": 0.6, "d": 0.5}
    r = rank_correlations(scores, acc)
    # pairs: (a,b) discordant, the other 5 concordant -> tau = (5 - 1) / 6; rho = 1 - 6 * (1 + 1) / (4 * 15)
    assert r["kendall_tau"] == pytest.approx(2 / 3)
    assert r["spearman_rho"] == pytest.approx(0.8)
    assert r["top1_regret"] == pytest.approx(0.2) and r["top_pick"] == "a" and r["best_source"] == "b"
    perfect = rank_correlations(scores, {"a": 90, "b": 80, "c": 70, "d": 60})
    assert perfect["kendall_tau"] == pytest.approx(1) and perfect["top1_regret"] == 0
    assert math.isnan(rank_correlations(scores, dict.fromkeys(scores, 0.5))["kendall_tau"])


def test_rank_correlation_errors():
    with pytest.raises(SimilarityError, match=r"same sources; only in scores: \['c'\]"):
        rank_correlations({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2})
    with pytest.raises(SimilarityError, match="at least 2"):
        rank_correlations({"a": 1}, {"a": 1})
    with pytest.raises(SimilarityError, match="'b'|b are not finite"):
        rank_correlations({"a": 1, "b": float("nan")}, {"a": 1, "b": 2})


# ---------------------------------------------------------------------------------------------- weights
def test_softmax_weights_on_z_scored_scores():
    w = weights_from_scores({"a": 1.0, "b": 0.0, "c": -1.0})
    z = np.array([1.0, 0.0, -1.0]) / np.std([1.0, 0.0, -1.0])
    expected = np.exp(z) / np.exp(z).sum()
    assert list(w) == ["a", "b", "c"] and np.allclose(list(w.values()), expected)
    scaled = weights_from_scores({"a": 1000.0, "b": 500.0, "c": 0.0})  # affine rescale: same weights
    assert np.allclose(list(scaled.values()), expected)


def test_softmax_temperature_sharpens_and_flattens():
    scores = {"a": 0.3, "b": 0.2, "c": 0.1, "d": 0.0}
    cold = weights_from_scores(scores, temperature=0.01)
    hot = weights_from_scores(scores, temperature=1e4)
    assert cold["a"] == pytest.approx(1.0) and max(hot.values()) - min(hot.values()) < 1e-3
    peaks = [weights_from_scores(scores, temperature=t)["a"] for t in (0.1, 0.5, 1.0, 5.0)]
    assert peaks == sorted(peaks, reverse=True)
    for w in (cold, hot):
        assert sum(w.values()) == pytest.approx(1.0)


def test_top_k_and_normalized_weights():
    scores = {"a": 3.0, "b": 1.0, "c": 0.0, "d": 2.0}
    top2 = weights_from_scores(scores, top_k=2)
    assert set(top2) == {"a", "d"} and sum(top2.values()) == pytest.approx(1.0) and top2["a"] > top2["d"]
    norm = weights_from_scores(scores, mode="normalized")  # (1, 1/3, 0, 2/3) / 2
    assert norm == pytest.approx({"a": 0.5, "d": 1 / 3, "b": 1 / 6, "c": 0.0})
    assert weights_from_scores(scores, mode="normalized", top_k=2) == pytest.approx({"a": 0.6, "d": 0.4})
    assert weights_from_scores({"a": 1.0, "b": 1.0}) == {"a": 0.5, "b": 0.5}
    assert weights_from_scores({"a": 1.0, "b": 1.0}, mode="normalized") == {"a": 0.5, "b": 0.5}
    assert weights_from_scores(scores, top_k=10).keys() == scores.keys()


@pytest.mark.parametrize("kwargs,match", [
    ({"scores": {"a": 1.0}}, "at least 2"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"scores": {"a": 1.0, "b": float("inf")}}, "not finite"),
    ({"mode": "rank"}, "unknown weight mode 'rank'"),
])
def test_weight_errors(kwargs, match):
    kwargs = {"scores": {"a": 1.0, "b": 0.0}, **kwargs}
    with pytest.raises(SimilarityError, match=match):
        weights_from_scores(**kwargs)
