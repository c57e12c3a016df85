"""A run's fidelity scores, all from feature sets computed once: FID, precision and recall, KID,
density and coverage, memorisation, per-class FID or KID, and FD_DINOv2 where weights are given.

Per class: FID needs many samples (its bias grows as the count falls; Chong and Forsyth 2020), so
each class gets an FID only where every class has at least PER_CLASS_FID_MIN synthetic and reference
images, and a KID otherwise, the same score for every class so that classes compare.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import torch

from privbench.metrics.frechet import fid_of_features
from privbench.metrics.kid import SUBSETS, default_subset_size, kid
from privbench.metrics.memorisation import memorisation
from privbench.metrics.names import MEMORISATION, MEMORISATION_HIGH, MEMORISATION_LOW, per_class
from privbench.metrics.precision_recall import DENSITY_COVERAGE_K, density_coverage, precision_recall

PER_CLASS_FID_MIN = 500


def scores(
    synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
    classes: tuple[str, ...], members: np.ndarray, non_members: np.ndarray, pr_k: int, seed: int,
    device: torch.device | str, detail: dict[str, Any],
) -> dict[str, tuple[float, Any]]:
    """Every score of synthetic features against real (reference) ones, and against the members and
    non-members for memorisation; `detail` (sample counts) goes with each."""
    precision, recall = precision_recall(real, synthetic, pr_k, device)
    density, coverage = density_coverage(real, synthetic, device=device)
    kid_mean, kid_std = kid(synthetic, real, seed=seed)
    kid_detail = detail | {"subsets": SUBSETS, "subset_size": default_subset_size(len(synthetic), len(real))}
    copied = memorisation(synthetic, members, non_members, seed, device)
    copied_detail = copied.to_dict() | {"synthetic": len(synthetic), "members": len(members), "non_members": len(non_members)}
    return {
        "fid": (fid_of_features(synthetic, real), detail),
        "precision": (precision, detail | {"k": pr_k}),
        "recall": (recall, detail | {"k": pr_k}),
        "kid": (kid_mean, kid_detail | {"std_over_subsets": kid_std}),
        "kid_std": (kid_std, kid_detail),
        "density": (density, detail | {"k": DENSITY_COVERAGE_K}),
        "coverage": (coverage, detail | {"k": DENSITY_COVERAGE_K}),
        MEMORISATION: (copied.score, copied_detail),
        MEMORISATION_LOW: (copied.interval[0], {}),
        MEMORISATION_HIGH: (copied.interval[1], {}),
    } | per_class_scores(synthetic, synthetic_labels, real, real_labels, classes, seed)


def per_class_scores(
    synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
    classes: tuple[str, ...], seed: int,
) -> dict[str, tuple[float, Any]]:
    """`fid/<class>` for every class where every class has enough images for FID, else `kid/<class>`
    (for each class with at least 2 images on both sides)."""
    groups = [(synthetic[synthetic_labels == c], real[real_labels == c]) for c in range(len(classes))]
    smallest = min(min(len(s), len(r)) for s, r in groups)
    use_fid = smallest >= PER_CLASS_FID_MIN
    scores = {}
    for name, (s, r) in zip(classes, groups):
        detail = {"synthetic": len(s), "reference": len(r)}
        if use_fid:
            scores[per_class("fid", name)] = (fid_of_features(s, r), detail)
        elif min(len(s), len(r)) >= 2:
            mean, std = kid(s, r, seed=seed)
            scores[per_class("kid", name)] = (mean, detail | {"std_over_subsets": std, "why_not_fid": (
                f"a class has {smallest} images, FID needs {PER_CLASS_FID_MIN} in every class")})
    return scores
