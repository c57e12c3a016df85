"""FID's arithmetic on Inception-sized features, without the network: statistics, the Fréchet
distance (a 2048 x 2048 matrix square root), and k-NN precision/recall.

Features are random float32 [N, 2048] (what privbench's feature cache holds) with unequal variances
and a few correlated directions, so the covariance is a full, well-conditioned matrix. Each result
is checked against a closed form or an independent computation.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from privbench.metrics.frechet import feature_statistics, frechet_distance
from privbench.metrics.precision_recall import precision_recall

DIM = 2048


@functools.lru_cache(maxsize=2)
def random_features(rows: int, seed: int = 0) -> np.ndarray:
    """[rows, 2048] float32: per-dimension scales in [0.5, 2] plus a rank-16 shared component."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, DIM), dtype=np.float32)
    scales = rng.uniform(0.5, 2.0, DIM).astype(np.float32)
    mix = (0.3 * rng.standard_normal((16, DIM))).astype(np.float32)
    return z * scales + z[:, :16] @ mix


@pytest.mark.parametrize("rows", [10_000, 50_000])
def test_feature_statistics(benchmark, rows):
    """Mean and unbiased covariance of N features (float64)."""
    features = random_features(rows)
    benchmark.group = "fid: feature statistics"
    mu, sigma = benchmark.pedantic(feature_statistics, args=(features,), rounds=2, iterations=1)
    assert mu.shape == (DIM,) and sigma.shape == (DIM, DIM) and np.isfinite(sigma).all()
    # Independent O(N D) checks: the mean, and the diagonal as per-dimension variances.
    np.testing.assert_allclose(mu, features.mean(axis=0, dtype=np.float64), rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.diag(sigma), features.var(axis=0, ddof=1, dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(sigma, sigma.T, rtol=0, atol=1e-12)


def _clean_fid_frechet_distance(*stats):
    """clean-fid's own implementation (scipy's sqrtm), timed beside privbench's."""
    import warnings

    from cleanfid.fid import frechet_distance as clean_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clean-fid passes sqrtm's deprecated `disp`
        return clean_frechet_distance(*stats)


@pytest.mark.parametrize("implementation", [frechet_distance, _clean_fid_frechet_distance], ids=["privbench", "clean-fid"])
def test_frechet_distance(benchmark, implementation):
    """The distance between N(mu, S) and N(a mu + c, a^2 S), whose closed form is
    ||(1 - a) mu - c||^2 + (1 - a)^2 tr(S): sqrt(S a^2 S) = a S for S positive definite. privbench's
    eigendecomposition and clean-fid's sqrtm side by side, on the same matrices."""
    mu1, sigma1 = feature_statistics(random_features(10_000))
    a, c = 0.8, np.linspace(-0.5, 0.5, DIM)
    mu2, sigma2 = a * mu1 + c, a * a * sigma1
    benchmark.group = "fid: frechet distance"
    distance = benchmark.pedantic(implementation, args=(mu1, sigma1, mu2, sigma2), rounds=2, iterations=1)
    expected = np.sum(((1 - a) * mu1 - c) ** 2) + (1 - a) ** 2 * np.trace(sigma1)
    assert distance == pytest.approx(expected, rel=1e-6)


def test_precision_recall(benchmark):
    """Improved precision/recall (k = 3) of 2,000 real features against a synthetic set made of half
    of them and half far away: exactly half the samples lie on the real manifold, and at least the
    copied half of the real set is covered. (5,000 rows cost ~25 s a call on a 2-core CPU: the
    k-NN distances are quadratic.)"""
    real = random_features(2_000, seed=1)
    synthetic = np.concatenate([real[:1_000], real[1_000:] + 100.0])
    benchmark.group = "fid: precision/recall"
    precision, recall = benchmark.pedantic(precision_recall, args=(real, synthetic), rounds=3, iterations=1)
    assert precision == 0.5
    assert 0.5 <= recall <= 1.0
