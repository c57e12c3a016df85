"""Improved precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020)
on Inception features.

Each set's manifold is the union of hyperspheres around its points, each with the radius to its
k-th nearest neighbour in the same set. Precision is the share of synthetic points inside the real
manifold (how many samples look real); recall the share of real points inside the synthetic
manifold (how much of the real data the samples cover). The paper uses k = 3.

Density and coverage use the real manifold alone, which outliers among the samples cannot inflate:
density is the mean number of real hyperspheres a synthetic point lies in, divided by k (about 1 when
the two distributions agree; above 1 where samples crowd around real modes); coverage is the share of
real points whose hypersphere holds at least one synthetic point. Naeem et al. (Section 4) use k = 5.
A point on a sphere's boundary counts as inside throughout; the prdc package, the authors', counts it
as outside, which differs only on ties (tests/test_metrics_fidelity.py compares the two).
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024  # rows of the distance matrix held at once
DENSITY_COVERAGE_K = 5


def kth_neighbour_radii(points: np.ndarray, k: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Distance from each point to its k-th nearest other point of the same set."""
    if not 1 <= k < len(points):
        raise ValueError(f"k must lie in [1, {len(points) - 1}] for {len(points)} points, got {k}")
    x = torch.as_tensor(points, dtype=torch.float64, device=device)
    # The (k+1)-th smallest distance in a row counts the point itself (distance 0) as the first.
    radii = [torch.cdist(x[i : i + CHUNK], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), CHUNK)]
    return torch.cat(radii).cpu().numpy()


def share_within(queries: np.ndarray, points: np.ndarray, radii: np.ndarray, device: torch.device | str = "cpu") -> float:
    """The share of `queries` that lie within radii[j] of some points[j] (boundary included)."""
    q = torch.as_tensor(queries, dtype=torch.float64, device=device)
    p = torch.as_tensor(points, dtype=torch.float64, device=device)
    r = torch.as_tensor(radii, dtype=torch.float64, device=device)
    inside = [(torch.cdist(q[i : i + CHUNK], p) <= r).any(dim=1) for i in range(0, len(q), CHUNK)]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: np.ndarray, synthetic: np.ndarray, k: int = 3, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(precision, recall) of synthetic features [M, D] against real features [N, D]."""
    precision = share_within(synthetic, real, kth_neighbour_radii(real, k, device), device)
    recall = share_within(real, synthetic, kth_neighbour_radii(synthetic, k, device), device)
    return precision, recall


def density_coverage(
    real: np.ndarray, synthetic: np.ndarray, k: int = DENSITY_COVERAGE_K, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(density, coverage) of synthetic features [M, D] against real features [N, D]."""
    r = torch.as_tensor(kth_neighbour_radii(real, k, device), dtype=torch.float64, device=device)
    x = torch.as_tensor(real, dtype=torch.float64, device=device)
    y = torch.as_tensor(synthetic, dtype=torch.float64, device=device)
    spheres_holding = torch.zeros(len(y), dtype=torch.float64, device=device)  # per synthetic point
    covered = []  # per real point
    for i in range(0, len(x), CHUNK):
        inside = torch.cdist(x[i : i + CHUNK], y) <= r[i : i + CHUNK, None]
        spheres_holding += inside.sum(dim=0)
        covered.append(inside.any(dim=1))
    return float(spheres_holding.mean() / k), float(torch.cat(covered).double().mean())
