"""KID (Bińkowski et al. 2018): its estimator against clean-fid's and against a hand computation, its
lack of bias where FID has one, and its spread over subsets."""

import numpy as np
import pytest
from cleanfid.fid import kernel_distance

from privbench.metrics.kid import kid, mmd2_unbiased, polynomial_kernel


def gaussian(n, dim=16, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, dim))


def test_one_subset_of_every_point_is_clean_fid_s_estimate():
    # With one subset as large as both sets, every draw is a permutation and the estimate is fixed,
    # whichever random state draws it: clean-fid's must then be ours.
    x, y = gaussian(60, shift=0.3, seed=0), gaussian(60, seed=1)
    mean, std = kid(x, y, subsets=1, subset_size=60)
    assert mean == pytest.approx(kernel_distance(y, x, num_subsets=1, max_subset_size=60), rel=1e-10)
    assert std == 0.0


def test_the_unbiased_mmd_by_hand():
    x, y = np.array([[1.0], [2.0]]), np.array([[0.0], [1.0]])
    k = lambda a, b: (a * b + 1) ** 3  # noqa: E731 (d = 1)
    expected = (2 * k(1, 2)) / 2 + (2 * k(0, 1)) / 2 - 2 * (k(1, 0) + k(1, 1) + k(2, 0) + k(2, 1)) / 4
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    assert mmd2_unbiased(kxx, kyy, kxy) == pytest.approx(expected)


def test_kid_is_unbiased_at_small_counts_where_fid_is_not():
    # Two sets from one distribution: KID's mean over many small draws is 0 within its error.
    estimates = [kid(gaussian(50, seed=2 * s), gaussian(50, seed=2 * s + 1), subsets=1)[0] for s in range(200)]
    assert abs(np.mean(estimates)) < 4 * np.std(estimates) / np.sqrt(len(estimates))


def test_subsets_hold_half_the_smaller_set_so_that_their_spread_means_something():
    x, y = gaussian(500, shift=0.2, seed=0), gaussian(500, seed=1)
    assert kid(x, y)[1] > 0
    assert kid(x, y, subset_size=500)[1] < 1e-12  # the whole set every time: no spread
    assert kid(x, y) == pytest.approx(kid(x, y, subset_size=250))


def test_kid_grows_with_the_shift_and_is_reproducible():
    real = gaussian(400, seed=0)
    near, far = kid(gaussian(300, shift=0.2, seed=1), real), kid(gaussian(300, shift=1.0, seed=1), real)
    assert 0 < near[0] < far[0] and near[1] > 0
    assert kid(gaussian(300, shift=0.2, seed=1), real) == near


def test_large_sets_give_what_precomputed_kernels_give(monkeypatch):
    from privbench.metrics import kid as kid_module

    x, y = gaussian(120, shift=0.3, seed=0), gaussian(100, seed=1)
    precomputed = kid(x, y, subsets=5, subset_size=50)
    monkeypatch.setattr(kid_module, "PRECOMPUTE_LIMIT", 10)
    assert kid(x, y, subsets=5, subset_size=50) == pytest.approx(precomputed, rel=1e-12)


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError, match="at least 2 points"):
        kid(gaussian(1), gaussian(10))
