"""From attack scores to audit numbers: ROC, AUC, TPR at fixed FPR with bootstrap intervals, and an
empirical epsilon lower bound.

Scores: higher means "member". A threshold t predicts member iff score >= t; the ROC runs over every
distinct score (plus t = +inf, the point (0, 0)), so tied scores move together and no threshold is
invented between them.

The lower bound: any (epsilon, delta)-DP mechanism forces every test to satisfy
FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta (Kairouz, Oh and Viswanath 2015), so
eps >= max(ln((1 - delta - FNR) / FPR), ln((1 - delta - FPR) / FNR)). With FPR and FNR replaced by
their Clopper-Pearson upper bounds at level 2.5% each, the bound holds with 95% confidence for a
fixed threshold (Jagielski, Ullman and Oprea 2020; Nasr et al. 2021). The threshold is the one that
maximises the bound on the same scores, as the privbench protocol specifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import beta

from privbench.data.base import ImageSet

FPR_TARGETS = (0.001, 0.01, 0.1)
CONFIDENCE_LEVEL = 0.025  # per Clopper-Pearson bound; two of them hold jointly with 95% confidence
BOOTSTRAP_RESAMPLES = 1000


def roc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over all distinct scores, thresholds descending from +inf."""
    members = np.sort(np.asarray(member_scores, np.float64))
    non_members = np.sort(np.asarray(non_member_scores, np.float64))
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("an ROC needs at least one member and one non-member score")
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([members, non_members]))[::-1]])
    tpr = (len(members) - np.searchsorted(members, thresholds, side="left")) / len(members)
    fpr = (len(non_members) - np.searchsorted(non_members, thresholds, side="left")) / len(non_members)
    return fpr, tpr, thresholds


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR among thresholds whose FPR does not exceed `target`."""
    return float(tpr[fpr <= target + 1e-12].max())


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC (trapezoids: a tie between a member and a non-member counts one half)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def clopper_pearson_upper(errors: np.ndarray | int, n: int, level: float = CONFIDENCE_LEVEL) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a rate from `errors` out of `n`: exceeded with
    probability at most `level`."""
    errors = np.asarray(errors, np.float64)
    bound = beta.ppf(1 - level, errors + 1, np.maximum(n - errors, 1e-300))
    return np.where(errors >= n, 1.0, bound)


@dataclass(frozen=True)
class EpsilonBound:
    epsilon: float  # the 95%-confidence lower bound, floored at 0
    threshold: float
    fpr_upper: float
    fnr_upper: float


def epsilon_lower_bound(
    member_scores: np.ndarray, non_member_scores: np.ndarray, delta: float, level: float = CONFIDENCE_LEVEL
) -> EpsilonBound:
    """The empirical epsilon lower bound at the threshold that maximises it."""
    fpr, tpr, thresholds = roc(member_scores, non_member_scores)
    n_members, n_non = len(member_scores), len(non_member_scores)
    fpr_hi = clopper_pearson_upper(np.rint(fpr * n_non), n_non, level)
    fnr_hi = clopper_pearson_upper(np.rint((1 - tpr) * n_members), n_members, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log((1 - delta - fnr_hi) / fpr_hi)
        other = np.log((1 - delta - fpr_hi) / fnr_hi)
    bounds = np.nan_to_num(np.maximum(one, other), nan=0.0, neginf=0.0)
    best = int(np.argmax(bounds))
    return EpsilonBound(max(float(bounds[best]), 0.0), float(thresholds[best]), float(fpr_hi[best]), float(fnr_hi[best]))


@dataclass(frozen=True)
class AuditResult:
    """What one attack achieved against one run (intervals: bootstrap 2.5 and 97.5 percentiles)."""

    attack: str
    members: int
    non_members: int
    auc: float
    auc_interval: tuple[float, float]
    tpr: dict[float, float]  # FPR target -> TPR
    tpr_interval: dict[float, tuple[float, float]]
    epsilon_lower_bound: EpsilonBound
    settings: dict = field(default_factory=dict)  # hyperparameters chosen on the calibration part

    def to_dict(self) -> dict:
        return {
            "attack": self.attack, "members": self.members, "non_members": self.non_members,
            "auc": self.auc, "auc_interval": list(self.auc_interval),
            "tpr_at_fpr": {f"{k:g}": {"tpr": v, "interval": list(self.tpr_interval[k])} for k, v in self.tpr.items()},
            "epsilon_lower_bound": vars(self.epsilon_lower_bound), "settings": self.settings,
        }


def bootstrap_intervals(
    member_scores: np.ndarray, non_member_scores: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[tuple[float, float], dict[float, tuple[float, float]]]:
    """95% percentile intervals of AUC and TPR@FPR, members and non-members resampled separately."""
    members, non_members = np.asarray(member_scores), np.asarray(non_member_scores)
    aucs, tprs = [], {t: [] for t in FPR_TARGETS}
    for _ in range(resamples):
        fpr, tpr, _ = roc(rng.choice(members, len(members)), rng.choice(non_members, len(non_members)))
        aucs.append(auc(fpr, tpr))
        for t in FPR_TARGETS:
            tprs[t].append(tpr_at_fpr(fpr, tpr, t))

    def interval(values) -> tuple[float, float]:
        lo, hi = np.percentile(values, [2.5, 97.5])
        return float(lo), float(hi)

    return interval(aucs), {t: interval(v) for t, v in tprs.items()}


def audit(
    attack: str, member_scores: np.ndarray, non_member_scores: np.ndarray, delta: float, *,
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, settings: dict | None = None,
) -> AuditResult:
    """Score an attack's output: every number the leaderboard and `privbench check` read."""
    if not (np.isfinite(member_scores).all() and np.isfinite(non_member_scores).all()):
        raise ValueError(f"attack {attack} returned non-finite scores")
    fpr, tpr, _ = roc(member_scores, non_member_scores)
    auc_interval, tpr_interval = bootstrap_intervals(member_scores, non_member_scores, resamples, np.random.default_rng(seed))
    return AuditResult(
        attack, len(member_scores), len(non_member_scores), auc(fpr, tpr), auc_interval,
        {t: tpr_at_fpr(fpr, tpr, t) for t in FPR_TARGETS}, tpr_interval,
        epsilon_lower_bound(member_scores, non_member_scores, delta), settings or {},
    )


def _choose(attack, target, members: ImageSet, non_members: ImageSet, settings, seed: int) -> tuple[dict, list[dict]]:
    """The setting with the highest TPR at 10% FPR (then AUC) on the calibration part."""
    trials = []
    for i, setting in enumerate(settings):
        s_members = attack.score(target, members, setting, torch.Generator().manual_seed(seed + 2 * i))
        s_non = attack.score(target, non_members, setting, torch.Generator().manual_seed(seed + 2 * i + 1))
        fpr, tpr, _ = roc(s_members, s_non)
        trials.append({"setting": setting, "tpr_at_0.1": tpr_at_fpr(fpr, tpr, 0.1), "auc": auc(fpr, tpr)})
    best = max(trials, key=lambda t: (t["tpr_at_0.1"], t["auc"]))
    return best["setting"], trials


def run_attack(
    attack, target, members: ImageSet, non_members: ImageSet, delta: float, *,
    calibration_fraction: float = 0.2, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
    spaces: tuple[str, ...] = ("pixel", "inception"),
) -> tuple[AuditResult, tuple[np.ndarray, np.ndarray]]:
    """Audit one attack: equal numbers of members and non-members, a random `calibration_fraction`
    of each chooses the attack's setting, the rest is scored once with it. Settings that measure
    distances in a feature space outside `spaces` are not tried. Returns the audit and the
    evaluation ROC (fpr, tpr) for plotting."""
    settings = [s for s in attack.settings if s.get("space", "pixel") in spaces]
    if not settings:
        raise ValueError(f"attack {attack.name} has no setting in the spaces {spaces}")
    n = min(len(members), len(non_members))
    n_calibration = round(calibration_fraction * n)
    if n_calibration < 2 or n - n_calibration < 2:
        raise ValueError(f"{n} members and non-members are too few to calibrate and evaluate an attack")
    rng = np.random.default_rng(seed)
    m_order, n_order = rng.permutation(len(members))[:n], rng.permutation(len(non_members))[:n]
    parts = {
        part: (members.subset(m_order[sl]), non_members.subset(n_order[sl]))
        for part, sl in (("calibration", slice(0, n_calibration)), ("evaluation", slice(n_calibration, n)))
    }
    setting, trials = _choose(attack, target, *parts["calibration"], settings, seed)
    eval_members, eval_non = parts["evaluation"]
    s_members = attack.score(target, eval_members, setting, torch.Generator().manual_seed(seed + 10_001))
    s_non = attack.score(target, eval_non, setting, torch.Generator().manual_seed(seed + 10_002))
    result = audit(attack.name, s_members, s_non, delta, resamples=resamples, seed=seed,
                   settings={"chosen": setting, "calibration": trials, "calibration_size": n_calibration})
    return result, roc(s_members, s_non)[:2]


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> bytes:
    """A log-log ROC plot (PNG bytes) of each attack's (fpr, tpr), with the chance diagonal."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    floor = 1e-4
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.clip(fpr, floor, 1), np.clip(tpr, floor, 1), label=name, drawstyle="steps-post")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.axvline(0.1, color="black", linewidth=0.5, alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()

