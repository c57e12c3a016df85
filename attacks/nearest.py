"""`nearest`: the full black-box attack of GAN-Leaks (Chen, Yu, Zhang and Fritz, CCS 2020).

An attacker who sees only the synthetic images scores each candidate by minus its mean distance to
its k nearest synthetic images: a generator that memorised a member reproduces something close to
it. Distances are Euclidean, in pixel space (images scaled to [0, 1]) or in Inception-v3 pool
feature space; k and the space are chosen on the calibration part. It applies to every method.
"""

from __future__ import annotations

import numpy as np
import torch

from privbench.attacks import ATTACKS, Target
from privbench.data.base import ImageSet
from privbench.metrics.inception import inception_features

CHUNK = 512  # candidates per distance matrix: bounds memory at CHUNK x synthetic floats


def _embed(images: ImageSet, space: str, device: torch.device) -> torch.Tensor:
    if space == "pixel":
        return torch.from_numpy(images.images).flatten(1).float() / 255
    return torch.from_numpy(inception_features(images.images, device, progress=False)).float()


def knn_distance(candidates: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Mean Euclidean distance of each candidate row to its k nearest reference rows."""
    out = []
    for start in range(0, len(candidates), CHUNK):
        distances = torch.cdist(candidates[start : start + CHUNK].double(), reference.double())
        out.append(distances.topk(min(k, len(reference)), dim=1, largest=False).values.mean(1))
    return torch.cat(out)


@ATTACKS.register("nearest")
class NearestNeighbour:
    name = "nearest"
    requires = frozenset()
    settings = tuple({"space": s, "k": k} for s in ("pixel", "inception") for k in (1, 3, 5))

    def __init__(self):
        self._embedded: dict[tuple[str, str], torch.Tensor] = {}  # (content hash, space) -> rows

    def _embedding(self, images: ImageSet, space: str, device: torch.device) -> torch.Tensor:
        """Embeddings are computed once per image set and space: settings differ only in k."""
        key = (images.content_hash(), space)
        if key not in self._embedded:
            self._embedded[key] = _embed(images, space, device)
        return self._embedded[key]

    def score(self, target: Target, candidates: ImageSet, setting: dict, generator: torch.Generator) -> np.ndarray:
        space = setting["space"]
        reference = self._embedding(target.samples, space, target.device)
        return -knn_distance(self._embedding(candidates, space, target.device), reference, setting["k"]).numpy()
