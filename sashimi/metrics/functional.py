"""The sample-quality formulas, on arrays of features or class probabilities, in float64 NumPy.

    frechet_distance(real_feats, fake_feats)       FID when the features are a classifier's embedding
    inception_score(fake_probs)                    IS
    modified_inception_score(fake_probs)           mIS
    am_score(fake_probs, real_probs)               AM score
    ndb(real_feats, fake_feats, n_bins=...)        NDB (number of statistically different bins)

Features are (N, D) arrays (one row per clip or frame); probabilities are (N, K) rows of a
classifier's softmax. Which direction is better, and the formula, is in each docstring and in
docs/metrics.md. Every input a user can get wrong (empty, too few rows, NaN, rows that are not
distributions) raises a ValueError that says what was expected.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MIN_SAMPLES_FOR_COVARIANCE", "gaussian_statistics", "frechet_distance_gaussians", "frechet_distance",
           "inception_score", "modified_inception_score", "am_score", "kmeans", "ndb"]

MIN_SAMPLES_FOR_COVARIANCE = 2  # the unbiased covariance divides by N - 1
_EPS = 1e-12  # probabilities are clipped to [_EPS, 1] inside logarithms


def _features(x, name: str, min_rows: int = 1) -> np.ndarray:
    """(N, D) float64 array from an array-like; ValueError naming `name` when it is not usable."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, features), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); at least {max(min_rows, 1)} sample(s) are needed")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name} has {a.shape[0]} sample(s); at least {min_rows} are needed to estimate a "
                         f"covariance")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _probabilities(p, name: str) -> np.ndarray:
    """(N, K) float64 rows that are distributions (non-negative, summing to 1 within 1e-4)."""
    a = _features(p, name)
    if a.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (columns), got {a.shape[1]}")
    if (a < 0).any() or np.abs(a.sum(axis=1) - 1.0).max() > 1e-4:
        raise ValueError(f"{name} must hold probability rows (non-negative, each summing to 1): pass the "
                         f"classifier's softmax, not its logits")
    return a / a.sum(axis=1, keepdims=True)


def gaussian_statistics(features, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) of the rows of `features`, float64.

    Needs at least MIN_SAMPLES_FOR_COVARIANCE (2) rows. With N <= D rows the covariance is
    singular: the Fréchet distance is still defined but biased upwards; use more samples.
    """
    x = _features(features, name, MIN_SAMPLES_FOR_COVARIANCE)
    mean = x.mean(axis=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(mean1, cov1, mean2, cov2) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mean1, cov1) and N(mean2, cov2).

        d^2 = |mean1 - mean2|^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))

    Tr((cov1 cov2)^(1/2)) is computed as the sum of sqrt of the eigenvalues of the symmetric
    PSD matrix cov1^(1/2) cov2 cov1^(1/2) (same eigenvalues, no complex round-off). >= 0; 0 iff
    the Gaussians are equal.
    """
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != (mean1.size, mean1.size):
        raise ValueError(f"Gaussians of different dimensions: means {mean1.shape} and {mean2.shape}, "
                         f"covariances {cov1.shape} and {cov2.shape}")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mean1 - mean2
    return float(max(0.0, diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt))


def frechet_distance(real_features, fake_features) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D). Lower is better.

    With a classifier's penultimate features this is the FID (Heusel et al., 2017); on log-mel
    frames it is a classifier-free distance of spectral statistics. Each set needs at least 2 rows.
    """
    mean1, cov1 = gaussian_statistics(real_features, "real features")
    mean2, cov2 = gaussian_statistics(fake_features, "fake features")
    if mean1.shape != mean2.shape:
        raise ValueError(f"real and fake features have different widths: {mean1.shape[0]} and {mean2.shape[0]}")
    return frechet_distance_gaussians(mean1, cov1, mean2, cov2)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p_i || q_i) in nats for each row (q broadcast), with q clipped to _EPS; 0 log 0 = 0."""
    logq = np.log(np.clip(q, _EPS, None))
    logp = np.log(np.clip(p, _EPS, None))
    return np.where(p > 0, p * (logp - logq), 0.0).sum(axis=-1)


def inception_score(probs) -> float:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) = mean of p(y|x) over the set. Higher is better.

    Ranges from 1 (every clip gets the same prediction) to K, the number of classes (each clip
    classified with certainty, the classes used equally often): confident and diverse samples.
    """
    p = _probabilities(probs, "probabilities")
    return float(math.exp(_kl_rows(p, p.mean(axis=0)).mean()))


def modified_inception_score(probs) -> float:
    """mIS = exp(E_{x_i, x_j} KL(p(y|x_i) || p(y|x_j))) over ordered pairs i != j. Higher is better.

    Gurumurthy et al. (2017): large when clips are classified confidently and differently from
    one another (within-class diversity enters only through the classifier). 1 when all
    predictions are equal; with one clip it is 1 by definition. O(N^2 K) memory in blocks.
    """
    p = _probabilities(probs, "probabilities")
    n = p.shape[0]
    if n < 2:
        return 1.0
    logp = np.log(np.clip(p, _EPS, None))
    neg_entropy = np.where(p > 0, p * logp, 0.0).sum(axis=1)  # sum_k p_ik log p_ik
    total = 0.0
    for start in range(0, n, 1024):  # KL(i || j) = sum_k p_ik log p_ik - sum_k p_ik log p_jk
        block = p[start:start + 1024]
        total += (neg_entropy[start:start + 1024, None] - block @ logp.T).sum()  # i == j terms are 0
    return float(math.exp(total / (n * (n - 1))))


def am_score(fake_probs, real_probs) -> float:
    """AM = KL(p_real(y) || p_fake(y)) + E_{x fake} H(p(y|x)), in nats. Lower is better (0 at best).

    Zhou et al. (2018): p_real(y), p_fake(y) are the mean predictions over the real and the fake
    set. The first term penalises class frequencies unlike the data's, the second unconfident
    predictions. Uniform predictions on balanced data give log K.
    """
    fake = _probabilities(fake_probs, "fake probabilities")
    real = _probabilities(real_probs, "real probabilities")
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"fake and real probabilities have different class counts: {fake.shape[1]} and {real.shape[1]}")
    entropy = -np.where(fake > 0, fake * np.log(np.clip(fake, _EPS, None)), 0.0).sum(axis=1)
    return float(_kl_rows(real.mean(axis=0), fake.mean(axis=0)) + entropy.mean())


def kmeans(x, k: int, seed: int = 0, n_iter: int = 100, n_init: int = 3) -> np.ndarray:
    """Centroids (k, D) of Lloyd's k-means with k-means++ starts; the best of n_init runs by inertia.

    Deterministic for a seed. An emptied cluster is restarted at the point farthest from its centroid.
    """
    x = _features(x, "k-means input")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({x.shape[0]}), got k={k}")
    rng = np.random.default_rng(seed)
    squared_norms = (x * x).sum(axis=1)

    def distances(c):  # (N, k) squared distances
        return np.maximum(squared_norms[:, None] - 2 * x @ c.T + (c * c).sum(axis=1)[None, :], 0.0)

    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centres = [x[rng.integers(x.shape[0])]]
        for _ in range(1, k):  # k-means++: next centre with probability proportional to squared distance
            d = distances(np.array(centres)).min(axis=1)
            total = d.sum()
            centres.append(x[rng.choice(x.shape[0], p=d / total)] if total > 0 else x[rng.integers(x.shape[0])])
        c = np.array(centres)
        for _ in range(n_iter):
            d = distances(c)
            assign = d.argmin(axis=1)
            new = c.copy()
            for j in range(k):
                members = assign == j
                if members.any():
                    new[j] = x[members].mean(axis=0)
                else:
                    new[j] = x[d[np.arange(len(x)), assign].argmax()]
            if np.allclose(new, c, rtol=0, atol=1e-12):
                c = new
                break
            c = new
        inertia = distances(c).min(axis=1).sum()
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def ndb(real_features, fake_features, n_bins: int = 10, alpha: float = 0.05, seed: int = 0) -> dict:
    """NDB: bins (k-means cells of the real features) whose fake proportion differs significantly. Lower is better.

    Richardson & Weiss (2018). The real features are clustered into n_bins cells; each fake
    feature falls into the cell of its nearest centroid. Per cell, a two-proportion z-test
    compares p_real and p_fake with the pooled proportion p = (n_r p_real + n_f p_fake) / (n_r + n_f):
    z = (p_real - p_fake) / sqrt(p (1 - p) (1/n_r + 1/n_f)); a cell counts when the two-sided
    p-value is below alpha. Returns {"ndb": count, "ndb_fraction": count / n_bins, "n_bins",
    "real_proportions", "fake_proportions"}. Two samples of one distribution give about
    alpha * n_bins; fixed `seed` makes it deterministic.
    """
    real = _features(real_features, "real features")
    fake = _features(fake_features, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features have different widths: {real.shape[1]} and {fake.shape[1]}")
    if not 2 <= n_bins <= real.shape[0]:
        raise ValueError(f"NDB needs 2 <= n_bins <= number of real samples ({real.shape[0]}), got n_bins={n_bins}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    centres = kmeans(real, n_bins, seed=seed)

    def proportions(x):
        d = (x * x).sum(axis=1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(axis=1)[None, :]
        return np.bincount(d.argmin(axis=1), minlength=n_bins) / x.shape[0]

    p_real, p_fake = proportions(real), proportions(fake)
    n_r, n_f = real.shape[0], fake.shape[0]
    pooled = (n_r * p_real + n_f * p_fake) / (n_r + n_f)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_r + 1 / n_f))
    z = np.divide(np.abs(p_real - p_fake), se, out=np.zeros(n_bins), where=se > 0)
    p_values = np.array([math.erfc(v / math.sqrt(2.0)) for v in z])  # two-sided normal tail
    count = int((p_values < alpha).sum())
    return {"ndb": count, "ndb_fraction": count / n_bins, "n_bins": n_bins,
            "real_proportions": p_real.tolist(), "fake_proportions": p_fake.tolist()}
