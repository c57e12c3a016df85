"""The names the audit's and the evaluation's numbers are stored under (those not spelled out where they
are computed): in the results database, a run's metrics.json and the leaderboard CSVs. Committed
boards and databases hold these names, so they never change.

Per attack: its TPR at 10% FPR and its empirical epsilon lower bound. Per run: the TPR of the attack
chosen on the calibration part, with its bootstrap interval, and the lower bound the run reports
(privbench.attacks.audit chooses both).
"""

from __future__ import annotations

AUDIT_PREFIX = "mia"  # every audit metric's name but EPS_LB starts with it
TPR = "mia_tpr@0.1"
TPR_LOW, TPR_HIGH = f"{TPR}_low", f"{TPR}_high"
EPS_LB = "eps_lb"
# A canary run's (privbench.attacks.canaries): the one-run bound, the largest over its threat models, and
# how many of the white-box measurements of its mechanism disagree with the ledger.
EPS_LB_CANARY = "eps_lb_canary"
CANARY_FAILURES = "canary_failures"
_ATTACK_PREFIX, _ATTACK_TPR, _ATTACK_EPS_LB = f"{AUDIT_PREFIX}/", "/tpr@0.1", "/eps_lb"


# Evaluation (privbench.metrics.memorisation): the share of samples closer to a member than unseen images are.
MEMORISATION = "memorisation"
MEMORISATION_LOW, MEMORISATION_HIGH = f"{MEMORISATION}_low", f"{MEMORISATION}_high"
FD_DINOV2 = "fd_dinov2"


def per_class(metric: str, class_name: str) -> str:
    """A score of the images of one class: `ca/<class>`, `fid/<class>`, `kid/<class>`."""
    return f"{metric}/{class_name}"


def attack_tpr(attack: str) -> str:
    return f"{_ATTACK_PREFIX}{attack}{_ATTACK_TPR}"


def attack_eps_lb(attack: str) -> str:
    return f"{_ATTACK_PREFIX}{attack}{_ATTACK_EPS_LB}"


def is_attack_tpr(name: str) -> bool:
    """Whether `name` is one attack's TPR at 10% FPR (`attack_tpr`)."""
    return name.startswith(_ATTACK_PREFIX) and name.endswith(_ATTACK_TPR)


def is_audit_metric(name: str) -> bool:
    """Whether the audit writes `name`: what a re-audit replaces and the rest of a run keeps."""
    return name.startswith(AUDIT_PREFIX) or name == EPS_LB


def canary_eps_lb(threat_model: str) -> str:
    return f"{EPS_LB_CANARY}/{threat_model}"
