"""Memorisation: the share of synthetic images that lie closer to a member than real unseen images do.

For each synthetic image, the distance (Inception features) to its nearest member; the threshold is
the 5th percentile of the same distance for non-members, images of the same distribution that the
generator never trained on. A generator that copies members puts its copies at distance ~0, below
the threshold: it scores near 1. One that samples the distribution without copying lies as close to
the members as fresh images do, and scores about 0.05.

The interval is a percentile bootstrap that resamples both the synthetic images and the non-members
(the threshold moves with the latter), so that it covers the noise of both. The members and
non-members are the audit's subsets (privbench.harness.audit_subsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from privbench.metrics.precision_recall import CHUNK

PERCENTILE = 5.0
RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class MemorisationResult:
    score: float  # the share of synthetic images closer to a member than the threshold
    interval: tuple[float, float]  # percentile bootstrap interval at CONFIDENCE
    threshold: float  # the PERCENTILE-th percentile of the non-members' nearest-member distances
    expected: float  # the score of a generator that samples like the non-members: PERCENTILE / 100

    def to_dict(self) -> dict:
        return {"interval": list(self.interval), "threshold": self.threshold, "expected_without_copying": self.expected,
                "percentile": PERCENTILE, "resamples": RESAMPLES, "confidence": CONFIDENCE}


def nearest_distances(queries: np.ndarray, points: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """The distance from each query to its nearest point."""
    q = torch.as_tensor(queries, dtype=torch.float64, device=device)
    p = torch.as_tensor(points, dtype=torch.float64, device=device)
    return torch.cat([torch.cdist(q[i : i + CHUNK], p).min(dim=1).values for i in range(0, len(q), CHUNK)]).cpu().numpy()


def memorisation(
    synthetic: np.ndarray, members: np.ndarray, non_members: np.ndarray, seed: int = 0,
    device: torch.device | str = "cpu",
) -> MemorisationResult:
    """The memorisation score of synthetic features [M, D] against member and non-member features."""
    to_synthetic = nearest_distances(synthetic, members, device)
    to_non_members = nearest_distances(non_members, members, device)

    def score(synthetic_picks: np.ndarray, non_member_picks: np.ndarray) -> float:
        threshold = np.percentile(to_non_members[non_member_picks], PERCENTILE)
        return float(np.mean(to_synthetic[synthetic_picks] < threshold))

    rng = np.random.default_rng(seed)
    boot = [score(rng.integers(len(to_synthetic), size=len(to_synthetic)), rng.integers(len(to_non_members), size=len(to_non_members)))
            for _ in range(RESAMPLES)]
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return MemorisationResult(
        score(np.arange(len(to_synthetic)), np.arange(len(to_non_members))), (float(low), float(high)),
        float(np.percentile(to_non_members, PERCENTILE)), PERCENTILE / 100,
    )
