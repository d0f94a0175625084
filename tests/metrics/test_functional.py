"""Tests of the sample-quality formulas (sashimi.metrics.functional) against float64 references and hand cases."""

import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from sashimi.metrics.functional import (MIN_SAMPLES_FOR_COVARIANCE, am_score, frechet_distance,
                                        frechet_distance_gaussians, gaussian_statistics, inception_score, kmeans,
                                        modified_inception_score, ndb)


def frechet_reference(mean1, cov1, mean2, cov2) -> float:
    """The textbook formula with a general matrix square root (scipy.linalg.sqrtm), float64."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    diff = mean1 - mean2
    return float(diff @ diff + np.trace(cov1 + cov2 - 2 * covmean))


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------------------------------ Fréchet


def test_identical_sets_give_zero():
    x = np.random.default_rng(0).standard_normal((500, 16)) * 3 + 1
    assert abs(frechet_distance(x, x)) < 1e-6


@given(st.integers(1, 12), st.integers(0, 2 ** 32 - 1))
def test_frechet_matches_sqrtm_reference(d, seed):
    rng = np.random.default_rng(seed)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = random_spd(rng, d), random_spd(rng, d)
    ref = frechet_reference(m1, c1, m2, c2)
    assert frechet_distance_gaussians(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-7, abs=1e-9)


def test_mean_shift_gives_closed_form():
    """Equal covariances: d^2 = |shift|^2 exactly; diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |shift|^2."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 8))
    shift = rng.standard_normal(8)
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    closed = float(shift @ shift + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance_gaussians(np.zeros(8), np.diag(a), shift, np.diag(b)) == pytest.approx(closed, rel=1e-12)


def test_frechet_grows_with_the_shift():
    rng = np.random.default_rng(2)
    real, fake = rng.standard_normal((400, 6)), rng.standard_normal((400, 6))
    distances = [frechet_distance(real, fake + s) for s in np.linspace(0, 3, 13)]
    assert all(b > a for a, b in zip(distances, distances[1:]))


def test_statistics_are_float64_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).standard_normal((50, 4)).astype(np.float32)
    mean, cov = gaussian_statistics(x)
    assert mean.dtype == cov.dtype == np.float64
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_too_few_samples_name_the_minimum():
    with pytest.raises(ValueError, match=f"at least {MIN_SAMPLES_FOR_COVARIANCE} are needed to estimate a covariance"):
        frechet_distance(np.zeros((1, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="empty"):
        frechet_distance(np.zeros((0, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="different widths"):
        frechet_distance(np.zeros((4, 3)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 3), np.nan), np.ones((5, 3)))


# -------------------------------------------------------------------------- IS, mIS, AM


def one_hot(labels, k):
    return np.eye(k)[np.asarray(labels)]


def test_inception_score_bounds():
    assert inception_score(np.full((20, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(one_hot(np.arange(40) % 10, 10)) == pytest.approx(10.0, rel=1e-9)
    assert inception_score(one_hot(np.zeros(40, int), 10)) == pytest.approx(1.0, abs=1e-9)  # confident, not diverse


def test_inception_score_hand_case():
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    marginal = p.mean(axis=0)
    kl = [sum(pi * math.log(pi / mi) for pi, mi in zip(row, marginal)) for row in p]
    assert inception_score(p) == pytest.approx(math.exp(sum(kl) / 2), rel=1e-12)


def test_modified_inception_score_hand_case():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    pairs = [kl(p[i], p[j]) for i in range(3) for j in range(3) if i != j]
    assert modified_inception_score(p) == pytest.approx(math.exp(sum(pairs) / 6), rel=1e-12)
    assert modified_inception_score(np.full((7, 4), 0.25)) == pytest.approx(1.0, abs=1e-12)
    assert modified_inception_score(p[:1]) == 1.0


def test_modified_inception_score_blocks_agree_with_the_loop():
    p = np.random.default_rng(4).dirichlet(np.ones(5), size=1500)  # more rows than one 1024 block
    logp = np.log(p)
    kl = (p * logp).sum(1)[:, None] - p @ logp.T
    assert modified_inception_score(p) == pytest.approx(math.exp(kl.sum() / (1500 * 1499)), rel=1e-10)


def test_am_score_hand_cases():
    k = 10
    balanced = one_hot(np.arange(50) % k, k)
    assert am_score(balanced, balanced) == pytest.approx(0.0, abs=1e-9)
    assert am_score(np.full((30, k), 1 / k), balanced) == pytest.approx(math.log(k), rel=1e-12)
    fake = np.array([[0.7, 0.3], [0.7, 0.3]])
    real = np.array([[0.5, 0.5], [0.5, 0.5]])
    entropy = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    kl = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert am_score(fake, real) == pytest.approx(kl + entropy, rel=1e-12)


def test_probability_checks():
    with pytest.raises(ValueError, match="softmax, not its logits"):
        inception_score(np.array([[2.0, -1.0]]))
    with pytest.raises(ValueError, match="empty"):
        inception_score(np.zeros((0, 10)))
    with pytest.raises(ValueError, match="different class counts"):
        am_score(np.full((3, 2), 0.5), np.full((3, 4), 0.25))


# ------------------------------------------------------------------------------------------ NDB


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(5)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    x = np.concatenate([c + 0.1 * rng.standard_normal((100, 2)) for c in centres])
    found = kmeans(x, 3, seed=0)
    assert np.abs(np.sort(found, axis=0) - np.sort(centres, axis=0)).max() < 0.1
    np.testing.assert_array_equal(found, kmeans(x, 3, seed=0))


def test_ndb_low_for_the_same_distribution_high_for_a_shift():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((2000, 4))
    same = rng.standard_normal((2000, 4))
    shifted = rng.standard_normal((2000, 4)) + np.array([1.0, 0, 0, 0])
    low = ndb(real, same, n_bins=20, seed=0)
    high = ndb(real, shifted, n_bins=20, seed=0)
    assert low["ndb"] <= 3 and high["ndb"] >= 10, (low["ndb"], high["ndb"])
    assert high["ndb_fraction"] == high["ndb"] / 20
    assert sum(low["real_proportions"]) == pytest.approx(1.0)
    assert ndb(real, shifted, n_bins=20, seed=0) == high  # fixed seed: deterministic


def test_ndb_checks():
    with pytest.raises(ValueError, match="n_bins"):
        ndb(np.zeros((5, 2)), np.zeros((5, 2)), n_bins=10)
    with pytest.raises(ValueError, match="empty"):
        ndb(np.zeros((50, 2)), np.zeros((0, 2)))
