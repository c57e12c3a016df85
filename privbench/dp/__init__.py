"""Differential privacy: the run's privacy ledger and the mechanisms that write to it."""

from privbench.dp.gaussian import RepeatedReleases, SelectedReleases, SubsampledReleases, release_gaussian
from privbench.dp.ledger import Mechanism, PrivacyLedger, compose
from privbench.dp.sgd import DPSGDPhase, DPSGDResult, per_sample_gradients, train_dp_sgd

__all__ = [
    "DPSGDPhase",
    "DPSGDResult",
    "Mechanism",
    "PrivacyLedger",
    "RepeatedReleases",
    "SelectedReleases",
    "SubsampledReleases",
    "compose",
    "per_sample_gradients",
    "release_gaussian",
    "train_dp_sgd",
]
