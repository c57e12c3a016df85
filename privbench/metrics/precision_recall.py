"""Improved precision and recall (Kynkäänniemi et al. 2019) on Inception features.

Each set's manifold is the union of hyperspheres around its points, each with the radius to its
k-th nearest neighbour in the same set. Precision is the share of synthetic points inside the real
manifold (how many samples look real); recall the share of real points inside the synthetic
manifold (how much of the real data the samples cover). The paper uses k = 3.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024  # rows of the distance matrix held at once


def kth_neighbour_radii(points: np.ndarray, k: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Distance from each point to its k-th nearest other point of the same set."""
    if not 1 <= k < len(points):
        raise ValueError(f"k must lie in [1, {len(points) - 1}] for {len(points)} points, got {k}")
    x = torch.as_tensor(points, dtype=torch.float64, device=device)
    # The (k+1)-th smallest distance in a row counts the point itself (distance 0) as the first.
    radii = [torch.cdist(x[i : i + CHUNK], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), CHUNK)]
    return torch.cat(radii).cpu().numpy()


def coverage(queries: np.ndarray, points: np.ndarray, radii: np.ndarray, device: torch.device | str = "cpu") -> float:
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
    precision = coverage(synthetic, real, kth_neighbour_radii(real, k, device), device)
    recall = coverage(real, synthetic, kth_neighbour_radii(synthetic, k, device), device)
    return precision, recall
