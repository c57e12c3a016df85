"""Inception Score (Salimans et al. 2016), only where Inception weights with a classification head exist.

IS = exp(E_x KL(p(y|x) || p(y))) over the 1008 (or 1000) ImageNet classes, reported as mean and
standard deviation over 10 splits. The offline FID weights privbench ships with end at the 2048-d
pool and have no logits, so IS is not computed with them: a made-up or proxy IS would be
incomparable with published ones. Point $PRIVBENCH_INCEPTION_LOGITS_WEIGHTS at a TorchScript
Inception-v3 that maps (N, 3, 299, 299) inputs scaled (x - 128) / 128 to class logits to enable it.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch

from privbench.errors import PrivbenchError
from privbench.metrics.inception import network_outputs, weights_from_env

LOGITS_ENV = "PRIVBENCH_INCEPTION_LOGITS_WEIGHTS"
UNAVAILABLE = (
    "not reported: the offline FID Inception-v3 has no classification head; set "
    f"{LOGITS_ENV} to a TorchScript Inception-v3 that outputs class logits to report it"
)


def logits_weights() -> Path | None:
    """The configured logits model, None when none is configured; a configured missing file is an error."""
    return weights_from_env(LOGITS_ENV, "a TorchScript Inception-v3")


@functools.lru_cache(maxsize=None)
def _load(path: str, device: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
        return torch.jit.load(path, map_location=device).eval()


def score_from_logits(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(mean KL(p(y|x) || p(y)))."""
    if len(logits) < splits:
        raise PrivbenchError(f"Inception Score needs at least {splits} images, got {len(logits)}")
    scores = []
    for part in np.array_split(np.asarray(logits, dtype=np.float64), splits):
        log_p = part - np.logaddexp.reduce(part, axis=1, keepdims=True)  # log softmax
        log_marginal = np.log(np.exp(log_p).mean(axis=0))
        scores.append(np.exp((np.exp(log_p) * (log_p - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(
    images: np.ndarray, device: str = "cpu", splits: int = 10, batch_size: int | None = None, progress: bool = True
) -> tuple[float, float] | None:
    """IS (mean, std) of uint8 NHWC images, or None when no logits weights are configured."""
    if (path := logits_weights()) is None:
        return None
    model = _load(str(path.resolve()), str(torch.device(device)))
    return score_from_logits(network_outputs(model, images, device, batch_size, progress, desc="inception score"), splits)
