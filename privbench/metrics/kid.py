"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", Section 4 and eq. 2).

KID is the squared maximum mean discrepancy between the two feature distributions under the cubic
polynomial kernel k(x, y) = (x.y / d + 1)^3, estimated without bias:

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2

averaged over random subsets of m points of each set, with the standard deviation over the subsets
(the paper's protocol; clean-fid's defaults: 100 subsets of at most 1,000). Unlike FID it has no bias
at small sample counts, so it compares runs of the CPU tiers' 500 samples with each other and with
larger runs. A subset as large as a whole set would be the same set every time (its spread 0 and
meaningless), so by default a subset holds at most half the smaller set: 250 of 500 samples.

clean-fid's `kernel_distance` computes the same estimator (tests/test_metrics_kid.py checks equality),
but draws its subsets from numpy's global random state (not reproducible run to run), returns no
spread, and recomputes the kernel for every subset; here the subsets come from a seeded generator and
the kernel matrices of small sets are computed once.
"""

from __future__ import annotations

import numpy as np

SUBSETS = 100
SUBSET_SIZE = 1000
# Up to this many points in the two sets together, their kernel matrices are computed once (at most
# 4,000^2 float64, 128 MB) and the subsets index into them.
PRECOMPUTE_LIMIT = 4000


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x_i, y_j) = (x_i . y_j / d + 1)^3 for every pair: [len(x), len(y)]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """The unbiased MMD^2 of two sets of m points from their kernel matrices (eq. 2)."""
    m = len(kxx)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / m**2)


def default_subset_size(synthetic: int, real: int) -> int:
    """SUBSET_SIZE, or half the smaller set where that is less (at least 2)."""
    return max(2, min(SUBSET_SIZE, min(synthetic, real) // 2))


def kid(
    synthetic: np.ndarray, real: np.ndarray, subsets: int = SUBSETS, subset_size: int | None = None, seed: int = 0
) -> tuple[float, float]:
    """(mean, standard deviation) of the unbiased MMD^2 over `subsets` subsets of m points drawn without
    replacement from each set: m = min(len(synthetic), len(real), subset_size), `default_subset_size`
    when None."""
    x, y = np.asarray(synthetic, np.float64), np.asarray(real, np.float64)
    if min(len(x), len(y)) < 2:
        raise ValueError(f"KID needs at least 2 points in each set, got {len(x)} and {len(y)}")
    m = min(len(x), len(y), subset_size or default_subset_size(len(x), len(y)))
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)) for _ in range(subsets)]
    if len(x) + len(y) <= PRECOMPUTE_LIMIT:
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        values = [mmd2_unbiased(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)]) for i, j in draws]
    else:
        values = [mmd2_unbiased(polynomial_kernel(x[i], x[i]), polynomial_kernel(y[j], y[j]), polynomial_kernel(x[i], y[j]))
                  for i, j in draws]
    return float(np.mean(values)), float(np.std(values))
