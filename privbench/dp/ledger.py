"""The privacy ledger: every use of sensitive members in a run, composed into one epsilon.

Each mechanism is a Gaussian mechanism with noise multiplier sigma (noise standard deviation divided
by L2 sensitivity), run `steps` times, in one of two subsampled forms:
  - "gaussian" and "dp-sgd": Poisson-subsampled with sample rate q (each member in each step
    independently with probability q), the form Opacus' accountants compose. A one-off Gaussian
    release of a statistic is q = 1, steps = 1; T releases of statistics of all members are q = 1,
    steps = T, whose T-fold composition is exactly a Gaussian mechanism with multiplier sigma / sqrt(T)
    (Dong, Roth and Su 2022, Cor. 3.3), which PRV reproduces (tests/test_ledger.py).
  - "selected-gaussian": the members are split into 1/q parts, each with its own state, and each
    step releases the statistic of one part drawn uniformly (GS-WGAN's discriminators). A member
    takes part with probability q, but when it does not, the step shows another part's statistic,
    which may differ from its own part's by any amount: nothing hides the step it is in, as the
    other members of a Poisson batch do. Its Renyi DP per step at order a is bounded by joint
    convexity of exp((a - 1) D_a) (van Erven and Harremoes 2014): with P = (1-q) A + q N(mu, s^2) and
    Q = (1-q) A + q N(mu', s^2), exp((a-1) D_a(P||Q)) <= 1 - q + q exp(a (a - 1) / (2 sigma^2)); a
    bound that is tight when the other parts' releases are far apart from this one's. Only the RDP
    accountant composes it.
Neighbouring datasets differ by adding or removing one member (the relation Opacus' accountants
assume), so a mechanism's sensitivity must be computed for add/remove.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from privbench.privacy import RANDOMNESS
from privbench.errors import PrivacyBudgetExceeded, PrivbenchError

log = logging.getLogger(__name__)

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}

# Calibration stops once the composed epsilon lies in [target * (1 - CALIBRATION_TOLERANCE), target].
CALIBRATION_TOLERANCE = 0.005
# Recording accepts a composed epsilon this far (relatively) above target: float noise in the
# accountant, never a real overspend.
RECORD_SLACK = 1e-6
# PRV is evaluated only where the RDP bound is below this: beyond it PRV's grid needs gigabytes.
PRV_DOMAIN_MAX_EPSILON = 50.0
# The orders at which Renyi DP is evaluated: Opacus' RDP accountant's.
RDP_ORDERS = RDPAccountant.DEFAULT_ALPHAS
SELECTED = "selected-gaussian"


@dataclass(frozen=True)
class Mechanism:
    """One use of the members: a subsampled Gaussian mechanism.

    `sensitivity` is the L2 sensitivity of the released statistic (the clipping norm for DP-SGD);
    the noise added has standard deviation `noise_std = noise_multiplier * sensitivity`.
    """

    name: str
    kind: Literal["gaussian", "dp-sgd", "selected-gaussian"]
    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1
    sensitivity: float = 1.0

    def __post_init__(self):
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"{self.name}: noise multiplier must be finite and >= 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"{self.name}: sample rate must lie in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"{self.name}: steps must be >= 1, got {self.steps}")
        if self.sensitivity <= 0:
            raise ValueError(f"{self.name}: sensitivity must be > 0, got {self.sensitivity}")

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.sensitivity


def compose(mechanisms: list[Mechanism], delta: float, accountant: str = "prv") -> tuple[float, str]:
    """Composed epsilon at `delta` of `mechanisms`, and the accountant that produced it.

    RDP is always computed first: it is cheap and always valid. PRV is tighter, but its
    discretisation grows without bound for very small noise, so it runs only where RDP's epsilon is
    at most PRV_DOMAIN_MAX_EPSILON (no sensible target lies beyond); where it fails numerically the
    RDP bound is used and a warning logged.
    """
    if not mechanisms:
        return 0.0, accountant
    if any(m.noise_multiplier == 0 for m in mechanisms):
        return math.inf, accountant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdp = rdp_epsilon(mechanisms, delta)
    if accountant == "rdp" or rdp > PRV_DOMAIN_MAX_EPSILON or any(m.kind == SELECTED for m in mechanisms):
        return rdp, "rdp"
    history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechanisms]
    try:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps = _epsilon(PRVAccountant, history, delta)
        if math.isfinite(eps) and eps >= 0:
            return eps, "prv"
        reason = f"returned {eps}"
    except Exception as exc:  # PRV's discretisation raises assorted errors outside its domain
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("PRV accountant failed (%s); falling back to RDP for %s", reason, history)
    return rdp, "rdp"


def rdp_curve(m: Mechanism, orders: list[float] = RDP_ORDERS) -> np.ndarray:
    """The Renyi DP of `m`'s `steps` at each order (see the module docstring for its two forms)."""
    if m.kind == SELECTED:
        a = np.asarray(orders, dtype=float)
        with np.errstate(over="ignore"):
            per_step = np.log1p(m.sample_rate * np.expm1(a * (a - 1) / (2 * m.noise_multiplier**2))) / (a - 1)
        return m.steps * per_step
    return np.asarray(rdp_analysis.compute_rdp(q=m.sample_rate, noise_multiplier=m.noise_multiplier, steps=m.steps,
                                               orders=orders))


def rdp_epsilon(mechanisms: list[Mechanism], delta: float) -> float:
    """Epsilon at `delta` of the mechanisms' summed Renyi DP, converted as Opacus' RDP accountant does."""
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=sum(rdp_curve(m) for m in mechanisms), delta=delta)
    return float(eps)


def _epsilon(accountant_cls, history, delta: float) -> float:
    accountant = accountant_cls()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def _bisect(total, goal: float, lo: float, hi: float, name: str) -> float:
    """The smallest sigma (to CALIBRATION_TOLERANCE in epsilon) with total(sigma) <= goal.

    Epsilon falls as sigma grows. Bisection on log(sigma) keeps the upper end (more noise) always
    feasible, so the result never exceeds the goal.
    """
    while total(hi) > goal:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyBudgetExceeded(f"{name}: no noise multiplier below 1e6 meets epsilon {goal:g}")
    while total(lo) <= goal and lo > 1e-4:
        lo, hi = lo / 2, lo
    for _ in range(60):
        if total(hi) >= goal * (1 - CALIBRATION_TOLERANCE):
            break
        mid = math.sqrt(lo * hi)
        if total(mid) > goal:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class PrivacyLedger:
    """The target (epsilon, delta) of a run and every mechanism that has touched its members.

    `randomness` says where the mechanisms' noise and sampling came from (privacy.randomness):
    "seeded" draws repeat from the run seed; "os" draws came from the operating system's entropy and
    cannot be repeated bit for bit.
    """

    epsilon: float
    delta: float
    accountant: str = "prv"
    mechanisms: list[Mechanism] = field(default_factory=list)
    randomness: str = "seeded"

    def __post_init__(self):
        if not (self.epsilon > 0):
            raise PrivbenchError(f"epsilon must be > 0 (or inf for no privacy), got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise PrivbenchError(f"delta must lie in (0, 1), got {self.delta}; a usual choice is 1e-5")
        if self.accountant not in ACCOUNTANTS:
            raise PrivbenchError(
                f"unknown accountant {self.accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}"
            )
        if self.randomness not in RANDOMNESS:
            raise PrivbenchError(f"unknown randomness {self.randomness!r}; choose one of: {', '.join(RANDOMNESS)}")

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def spent(self) -> float:
        """The composed epsilon of everything recorded so far: the number tables print."""
        return compose(self.mechanisms, self.delta, self.accountant)[0]

    def record(self, mechanism: Mechanism) -> Mechanism:
        """Add a mechanism, refusing it if the composed epsilon would pass the target."""
        if mechanism.name in {m.name for m in self.mechanisms}:
            raise ValueError(f"mechanism {mechanism.name!r} is already in the ledger")
        total, _ = compose([*self.mechanisms, mechanism], self.delta, self.accountant)
        if total > self.epsilon * (1 + RECORD_SLACK):
            raise PrivacyBudgetExceeded(
                f"{mechanism.name} would raise the composed epsilon to {total:.4g}, past the target "
                f"{self.epsilon:g}; lower its cost (more noise, fewer steps) or raise --eps"
            )
        self.mechanisms.append(mechanism)
        return mechanism

    def calibrate(
        self,
        name: str,
        kind: Literal["gaussian", "dp-sgd", "selected-gaussian"],
        *,
        sample_rate: float = 1.0,
        steps: int = 1,
        sensitivity: float = 1.0,
        epsilon: float | None = None,
    ) -> Mechanism:
        """The mechanism with the smallest noise multiplier that keeps the composed epsilon of
        everything recorded plus it at or below `epsilon` (default: the target) and within
        CALIBRATION_TOLERANCE of it. It is returned, not recorded: record it when it is used.
        """
        goal = self.epsilon if epsilon is None else epsilon
        if goal > self.epsilon:
            raise ValueError(f"{name}: calibration goal {goal} exceeds the ledger target {self.epsilon}")

        def make(sigma: float) -> Mechanism:
            return Mechanism(name, kind, sigma, sample_rate, steps, sensitivity)

        if not math.isfinite(goal):
            return make(0.0)

        def total(sigma: float) -> float:
            return compose([*self.mechanisms, make(sigma)], self.delta, self.accountant)[0]

        if self.spent() >= goal:
            raise PrivacyBudgetExceeded(
                f"{name}: nothing is left of epsilon {goal:g} after {', '.join(m.name for m in self.mechanisms)}; "
                "raise --eps or give the earlier mechanisms more noise"
            )
        # RDP bounds PRV from above, so where RDP alone can meet the goal its sigma is feasible for
        # either accountant and PRV's lies below it: calibrate with cheap RDP first, then refine
        # within [sigma_rdp / 4, sigma_rdp] (each PRV evaluation costs up to seconds).
        def rdp_total(sigma: float) -> float:
            return compose([*self.mechanisms, make(sigma)], self.delta, "rdp")[0]

        lo, hi = 0.05, 1.0
        if self.accountant == "rdp" or compose(self.mechanisms, self.delta, "rdp")[0] < goal:
            hi = _bisect(rdp_total, goal, lo, hi, name)
            if self.accountant == "rdp":
                return make(hi)
            lo = hi / 4
        sigma = _bisect(total, goal, lo, hi, name)
        return make(sigma)

    def to_dict(self) -> dict:
        eps, used = compose(self.mechanisms, self.delta, self.accountant)
        return {
            "target_epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "composed_epsilon": eps,
            "composed_with": used,
            "mechanisms": [asdict(m) for m in self.mechanisms],
            "randomness": self.randomness,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PrivacyLedger":
        return cls(
            epsilon=float(data["target_epsilon"]),
            delta=float(data["delta"]),
            accountant=data["accountant"],
            mechanisms=[Mechanism(**m) for m in data["mechanisms"]],
            randomness=data.get("randomness", "seeded"),  # ledgers saved before the setting drew seeded
        )
