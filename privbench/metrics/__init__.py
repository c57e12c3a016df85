"""Scores of a run: fidelity (FID), utility (classification accuracy) and compute cost."""

from privbench.metrics.inception import inception_features
from privbench.metrics.frechet import fid, reference_statistics
from privbench.metrics.accuracy import AccuracyResult, classification_accuracy
from privbench.metrics.cost import CostRecorder

__all__ = [
    "AccuracyResult",
    "CostRecorder",
    "classification_accuracy",
    "fid",
    "inception_features",
    "reference_statistics",
]
