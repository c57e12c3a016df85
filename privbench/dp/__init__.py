"""Differential privacy: the run's privacy ledger and the mechanisms that write to it."""

from privbench.dp.gaussian import release_gaussian
from privbench.dp.ledger import Mechanism, PrivacyLedger, compose

__all__ = ["Mechanism", "PrivacyLedger", "compose", "release_gaussian"]
