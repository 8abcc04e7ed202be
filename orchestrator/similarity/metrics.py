"""Closed-form transferability metrics: LogME, LEEP, NCE, H-score, GBC (registered in ``SIMILARITY``).

All take ``features`` (N, D) float32 — the frozen source model's features on the labeled target images —
``labels`` (N,) int64 in [0, C), optionally ``source_logits`` (N, K) float32, and ``seed`` (unused by the
deterministic ones). All return a float, higher = expected to transfer better, and raise
:class:`~orchestrator.similarity.core.SimilarityError` on bad inputs (see ``check_features``) or a non-finite
result. Computation is in float64.
"""
from __future__ import annotations

import numpy as np

from orchestrator.similarity.core import check_features, check_logits, finite_score, register_metric

LOGME_MAX_ITER = 300
LOGME_TOL = 1e-6
LOGME_EV_TOL = 1e-10
HSCORE_RCOND = 1e-6
GBC_PCA_DIMS = 64
GBC_VAR_FLOOR = 1e-4


# --------------------------------------------------------------------------------------------------- LogME
def _logme_terms(s2: np.ndarray, z: np.ndarray, out2: float, alpha: float, beta: float):
    """Posterior quantities of Bayesian linear regression in the SVD basis of F (You et al. 2021, Sec. 4).

    ``s2`` (r,) squared singular values of F, ``z = U^T y`` (r,), ``out2 = |y|^2 - |z|^2`` (the part of y
    outside F's column space). Returns (gamma, |m|^2, |F m - y|^2, sum_i log(alpha + beta s_i^2))."""
    lam = alpha + beta * s2
    gamma = float(np.sum(beta * s2 / lam))
    m2 = float(np.sum((beta * np.sqrt(s2) * z / lam) ** 2))
    res2 = float(np.sum((alpha * z / lam) ** 2) + out2)
    return gamma, m2, res2, float(np.sum(np.log(lam)))


def _logme_svd(features: np.ndarray, target: np.ndarray):
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    z = u.T @ target
    return s**2, z, max(float(target @ target - z @ z), 0.0)


def logme_evidence(n: int, d: int, s2, z, out2: float, alpha: float, beta: float) -> float:
    """Log evidence per sample, L(alpha, beta) / N, of y = F w + eps, w ~ N(0, alpha^-1 I_D),
    eps ~ N(0, beta^-1 I_N) (You et al. 2021, Sec. 4, the log of the evidence integral):

        L = N/2 log beta + D/2 log alpha - N/2 log 2pi - beta/2 |F m - y|^2 - alpha/2 |m|^2 - 1/2 log|A|,
        A = alpha I + beta F^T F,  m = beta A^-1 F^T y,

    with log|A| = sum_{i<r} log(alpha + beta s_i^2) + (D - r) log alpha for the r = min(N, D) singular values.
    """
    _, m2, res2, logdet_r = _logme_terms(s2, z, out2, alpha, beta)
    logdet = logdet_r + (d - len(s2)) * np.log(alpha)
    ev = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
          - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)
    return float(ev / n)


def logme_fit(features: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """Maximise the evidence over (alpha, beta) for one regression target (You et al. 2021, Algorithm 1):
    start at alpha = beta = 1 and iterate MacKay's fixed point

        gamma = sum_i beta s_i^2 / (alpha + beta s_i^2),
        alpha <- gamma / |m|^2,  beta <- (N - gamma) / |F m - y|^2

    until alpha/beta changes by < 1e-6 (relative), the evidence by < 1e-10 nats per sample, or 300 iterations.
    When D >= N the supremum can lie at beta -> inf (noise-free interpolation; the evidence stays finite): the
    iteration then stops at the last finite (alpha, beta), whose evidence is within the tolerance of it.

    Args:
        features: (N, D) float64. target: (N,) float64.

    Returns:
        (alpha, beta, log evidence per sample at that alpha, beta); non-finite = degenerate features.
    """
    n, d = features.shape
    alpha, beta, prev = 1.0, 1.0, -np.inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s2, z, out2 = _logme_svd(features, target)
        for _ in range(LOGME_MAX_ITER):
            gamma, m2, res2, _ = _logme_terms(s2, z, out2, alpha, beta)
            if not m2 > 0:  # target orthogonal to the features (or NaN): no evidence maximum to find
                return alpha, beta, float("nan")
            new_alpha, new_beta = gamma / m2, (n - gamma) / res2 if res2 > 0 else np.inf
            if not (np.isfinite(new_alpha) and np.isfinite(new_beta) and new_beta > 0):
                break  # beta -> inf boundary
            ratio_change = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta)
            alpha, beta = float(new_alpha), float(new_beta)
            ev = logme_evidence(n, d, s2, z, out2, alpha, beta)
            if ratio_change < LOGME_TOL or abs(ev - prev) < LOGME_EV_TOL:
                break
            prev = ev
        return alpha, beta, logme_evidence(n, d, s2, z, out2, alpha, beta)


@register_metric("logme", needs_source_logits=False,
                 reference="You et al., ICML 2021, LogME, Sec. 4 (evidence maximisation)")
def logme(features, labels, source_logits=None, seed: int = 0) -> float:
    """LogME: mean over the C one-hot label columns of the maximised log evidence per sample (You et al.,
    ICML 2021, Sec. 4: one evidence maximisation per column, then the average), ``(1/C) sum_c max_{alpha,beta} L_c(alpha, beta) / N`` (see :func:`logme_fit`).
    Features are used as given (no centring), as in the paper. Units: nats per sample.

    Raises SimilarityError on bad inputs or a non-finite evidence."""
    f, y, classes = check_features(features, labels)
    onehot = np.eye(classes.size)[y]
    evidences = [logme_fit(f, onehot[:, c])[2] for c in range(classes.size)]
    return finite_score(np.mean(evidences), "logme")


# ------------------------------------------------------------------------------------------------ LEEP / NCE
def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits (max-subtracted for stability). Returns (N, K)."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@register_metric("leep", needs_source_logits=True, reference="Nguyen et al., ICML 2020, LEEP, eq. 1-2")
def leep(features, labels, source_logits=None, seed: int = 0) -> float:
    """LEEP (Nguyen et al., ICML 2020): with theta = softmax(source_logits) (N, K),

        P(y, z) = (1/N) sum_{i: y_i = y} theta(x_i)_z          (eq. 1, the empirical joint, (C, K))
        P(y | z) = P(y, z) / sum_y' P(y', z)
        LEEP = (1/N) sum_i log sum_z P(y_i | z) theta(x_i)_z    (eq. 2, nats, <= 0)

    ``features`` are only validated (shape, N). Raises SimilarityError without logits or on bad inputs."""
    _, y, classes = check_features(features, labels)
    theta = softmax(check_logits(source_logits, y.size, "leep"))
    joint = np.eye(classes.size)[y].T @ theta / y.size
    cond = joint / joint.sum(axis=0, keepdims=True)
    eep = np.sum(theta * cond[y], axis=1)
    return finite_score(np.mean(np.log(eep)), "leep")


@register_metric("nce", needs_source_logits=True,
                 reference="Tran et al., ICCV 2019, NCE (conditional entropy, Sec. 3)")
def nce(features, labels, source_logits=None, seed: int = 0) -> float:
    """NCE (Tran et al., ICCV 2019): the negative conditional entropy of the target labels Y given the source
    model's hard predictions Z = argmax_k source_logits (ties -> lowest k), from the empirical joint:

        NCE = -H(Y | Z) = sum_{y,z} P(y, z) log (P(y, z) / P(z))     (nats, <= 0)

    ``features`` are only validated. Raises SimilarityError without logits or on bad inputs."""
    _, y, classes = check_features(features, labels)
    z = check_logits(source_logits, y.size, "nce").argmax(axis=1)
    joint = np.zeros((classes.size, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0 / y.size)
    pz = np.broadcast_to(joint.sum(axis=0, keepdims=True), joint.shape)
    nz = joint > 0
    return finite_score(np.sum(joint[nz] * np.log(joint[nz] / pz[nz])), "nce")


# --------------------------------------------------------------------------------------------------- H-score
@register_metric("hscore", needs_source_logits=False,
                 reference="Bao et al., ICIP 2019, H-score (Definition of H(f))")
def hscore(features, labels, source_logits=None, seed: int = 0) -> float:
    """H-score (Bao et al., ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))`` with f the centred features (N, D),
    cov(f) = f^T f / N and E[f | y] each image's class-mean feature. Dimensionless, in [0, min(D, C - 1)].

    ``^+`` is the Moore-Penrose pseudo-inverse with singular values below 1e-6 x the largest dropped: D may
    exceed N (cov(f) singular) and near-null directions would otherwise dominate the trace with noise. With
    D >= N - 1 the class means lie in the span of the features and the score saturates at C - 1 (it no longer
    discriminates sources): reduce the features (PCA) first in that regime.

    Raises SimilarityError on bad inputs or a non-finite score."""
    f, y, classes = check_features(features, labels)
    with np.errstate(over="ignore", invalid="ignore"):
        f = f - f.mean(axis=0)
        cov_f = f.T @ f / f.shape[0]
        g = np.stack([f[y == c].mean(axis=0) for c in range(classes.size)])[y]
        cov_g = g.T @ g / f.shape[0]
        if not (np.isfinite(cov_f).all() and np.isfinite(cov_g).all()):
            return finite_score(float("nan"), "hscore")
        inv = np.linalg.pinv(cov_f, rcond=HSCORE_RCOND, hermitian=True)
        return finite_score(np.sum(inv * cov_g), "hscore")


# ------------------------------------------------------------------------------------------------------- GBC
def pca_reduce(features: np.ndarray, dims: int) -> np.ndarray:
    """Project centred (N, D) features on their top ``min(dims, N - 1)`` principal axes if D > dims (SVD,
    deterministic up to axis signs, to which GBC is invariant); else return the centred features."""
    f = features - features.mean(axis=0)
    if f.shape[1] <= dims:
        return f
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    return f @ vt[: max(1, min(dims, f.shape[0] - 1))].T


def bhattacharyya_diag(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Bhattacharyya distance between every pair of diagonal Gaussians (Pándy et al. 2022, Sec. 3, the
    standard closed form for Gaussians):

        D_B(i, j) = 1/8 (mu_i - mu_j)^T S^-1 (mu_i - mu_j) + 1/2 log(det S / sqrt(det S_i det S_j)),
        S = (S_i + S_j) / 2.

    Args: mu (C, d), var (C, d) > 0. Returns (C, C) float64, zero diagonal."""
    avg = (var[:, None, :] + var[None, :, :]) / 2
    maha = np.sum((mu[:, None, :] - mu[None, :, :]) ** 2 / avg, axis=2) / 8
    logvar = np.log(var).sum(axis=1)
    logdet = np.log(avg).sum(axis=2) - (logvar[:, None] + logvar[None, :]) / 2
    return maha + logdet / 2


@register_metric("gbc", needs_source_logits=False,
                 reference="Pándy et al., CVPR 2022, GBC (Sec. 3, diagonal Gaussians)")
def gbc(features, labels, source_logits=None, seed: int = 0) -> float:
    """GBC (Pándy et al., CVPR 2022): fit a diagonal Gaussian N(mu_c, diag(var_c)) to each class of the
    features, then ``GBC = -sum_{i != j} BC(c_i, c_j)`` with ``BC = exp(-D_B)`` (each unordered pair
    counted twice, as in the paper's double sum). Dimensionless, in [-C(C-1), 0].

    Choices: features are centred and, if D > 64, PCA-reduced to 64 dims (the paper's experiments reduce
    dimensionality with PCA first; 64 is our setting, keeping the per-class variances estimable from few
    images); var_c is the maximum-likelihood (ddof=0) variance, floored at 1e-4 x the mean per-dimension
    variance of all images (scale-free version of the reference code's 1e-4 floor), so a class of identical
    images does not give log(0).

    Raises SimilarityError on bad inputs or a non-finite score."""
    f, y, classes = check_features(features, labels)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        f = pca_reduce(f, GBC_PCA_DIMS)
        floor = GBC_VAR_FLOOR * float(f.var(axis=0).mean())
        mu = np.stack([f[y == c].mean(axis=0) for c in range(classes.size)])
        var = np.stack([np.maximum(f[y == c].var(axis=0), floor) for c in range(classes.size)])
        bc = np.exp(-bhattacharyya_diag(mu, var))
    np.fill_diagonal(bc, 0.0)
    return finite_score(-bc.sum(), "gbc")


# -------------------------------------------------------------------------------- cross-validated probes
KNN_K = 5
MAX_FOLDS = 5


def _folds(y: np.ndarray, seed: int):
    """Stratified, shuffled (``seed``) k-fold splits, k = min(5, smallest class count) (>= 2 after checks)."""
    from sklearn.model_selection import StratifiedKFold

    k = int(min(MAX_FOLDS, np.bincount(y).min()))
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(y.size), y)


def _cv_accuracy(f: np.ndarray, y: np.ndarray, seed: int, make_model) -> float:
    """Out-of-fold accuracy over all N images (fraction in [0, 1]); ``make_model(n_train)`` -> estimator."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    correct = 0
    for train, test in _folds(y, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = make_model(train.size).fit(f[train], y[train])
        correct += int(np.sum(model.predict(f[test]) == y[test]))
    return correct / y.size


@register_metric("knn", needs_source_logits=False,
                 reference="cross-validated kNN accuracy (a common transferability baseline)")
def knn(features, labels, source_logits=None, seed: int = 0) -> float:
    """Stratified k-fold (k = min(5, smallest class count), shuffled with ``seed``) out-of-fold accuracy of a
    k-nearest-neighbour classifier on the features: cosine distance, 5 neighbours (fewer if a training fold is
    smaller), uniform votes (ties -> lowest label). Units: accuracy, a fraction in [0, 1].

    Raises SimilarityError on bad inputs."""
    from sklearn.neighbors import KNeighborsClassifier

    f, y, _ = check_features(features, labels)
    acc = _cv_accuracy(f, y, seed, lambda n: KNeighborsClassifier(
        n_neighbors=min(KNN_K, n), metric="cosine", algorithm="brute"))
    return finite_score(acc, "knn")


@register_metric("linear_probe", needs_source_logits=False,
                 reference="cross-validated logistic-regression accuracy (linear probe)")
def linear_probe(features, labels, source_logits=None, seed: int = 0) -> float:
    """Stratified k-fold (as :func:`knn`) out-of-fold accuracy of multinomial logistic regression on the
    standardised features (scikit-learn ``StandardScaler`` fitted per training fold, L2 penalty C = 1,
    lbfgs, up to 1000 iterations). Units: accuracy, a fraction in [0, 1].

    Raises SimilarityError on bad inputs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, y, _ = check_features(features, labels)
    acc = _cv_accuracy(f, y, seed, lambda n: make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)))
    return finite_score(acc, "linear_probe")
