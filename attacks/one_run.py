"""The one-run audit of Steinke, Nasr and Jagielski (2023), "Privacy auditing with one (1) training run":
an epsilon lower bound from M canaries, each included in the training data independently with
probability 1/2, in a single training run.

The auditor scores every canary, guesses "in" for the k+ highest scores and "out" for the k- lowest,
and abstains on the rest. Their Theorem 5.2: if the training run is (eps, delta)-DP, the number W of
correct guesses among r = k+ + k- satisfies, for every v,

    P[W >= v] <= P[B >= v] + 2 M delta max_{1 <= i <= v} P[v - i <= B < v] / i,   B ~ Binomial(r, e^eps / (1 + e^eps)).

So observing v correct guesses rejects every epsilon whose right-hand side is at most the significance
(5%); the bound is the largest such epsilon. With delta = 0 the right-hand side is the exact binomial
tail, the Clopper-Pearson test of the guesses' precision against e^eps / (1 + e^eps).

The bound can never exceed what M canaries can show: r = M guesses, all correct. That ceiling
(`ceiling`) grows like ln(M / ln(1 / significance)), so a run with a large epsilon cannot be audited
tightly in one run with few canaries (at 95% and delta 1e-5: 3.5 with 100 canaries, 5.8 with 1,000,
7.3 with 5,000; Steinke et al., Figure 1, show the same saturation).

Which k+ and k- to use is fixed before the scores are seen, from canaries simulated in the very
mechanism the ledger accounts (`ideal_scores`, `choose_guesses`): that choice costs no confidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import expit, logsumexp
from scipy.stats import binom

SIGNIFICANCE = 0.05
# Where the bisection for the bound stops: beyond it the p-value is 1 to float precision for any M here.
EPSILON_SEARCH_LIMIT = 60.0
# Guess counts tried by `choose_guesses`: k+ and k- are 0 or M times one of these fractions.
GUESS_FRACTIONS = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability, under (epsilon, delta)-DP, of at least `correct` right guesses out of `guesses`
    (Steinke et al. 2023, Theorem 5.2)."""
    if correct <= 0:
        return 1.0
    p = expit(epsilon)
    tail = binom.sf(correct - 1, guesses, p)
    if delta == 0:
        return float(tail)
    shifts = np.arange(1, correct + 1)
    window = (binom.sf(correct - shifts - 1, guesses, p) - tail) / shifts
    return float(min(1.0, tail + 2 * canaries * delta * window.max()))


def lower_bound(canaries: int, guesses: int, correct: int, delta: float, significance: float = SIGNIFICANCE) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` reject at `significance`; 0 if
    they reject none. The p-value grows with epsilon, so the set rejected is an interval from 0."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    if p_value(canaries, guesses, correct, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, EPSILON_SEARCH_LIMIT
    if p_value(canaries, guesses, correct, hi, delta) <= significance:
        return hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(canaries, guesses, correct, mid, delta) <= significance else (lo, mid)
    return lo


def ceiling(canaries: int, delta: float, significance: float = SIGNIFICANCE) -> float:
    """The highest bound `canaries` can give: every canary guessed, every guess right."""
    return lower_bound(canaries, canaries, canaries, delta, significance)


@dataclass(frozen=True)
class OneRunResult:
    """One audit's outcome: the bound, the guesses that gave it and the most those canaries could show."""

    epsilon: float
    canaries: int
    guesses_in: int
    guesses_out: int
    correct: int
    ceiling: float
    significance: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_correct(scores: np.ndarray, included: np.ndarray, guesses_in: int, guesses_out: int) -> int:
    """Right guesses when the `guesses_in` highest scores are called in and the `guesses_out` lowest out
    (ties broken by canary order, which is independent of inclusion)."""
    if guesses_in + guesses_out > len(scores):
        raise ValueError(f"{guesses_in} + {guesses_out} guesses for {len(scores)} canaries")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    included = np.asarray(included, bool)
    right_in = included[order[:guesses_in]].sum()
    right_out = (~included[order[len(order) - guesses_out:]]).sum() if guesses_out else 0
    return int(right_in + right_out)


def one_run_audit(
    scores: np.ndarray, included: np.ndarray, delta: float, guesses_in: int, guesses_out: int,
    significance: float = SIGNIFICANCE,
) -> OneRunResult:
    """The one-run bound from canary scores (higher: more likely in) and their inclusion."""
    m = len(scores)
    correct = count_correct(scores, included, guesses_in, guesses_out)
    return OneRunResult(lower_bound(m, guesses_in + guesses_out, correct, delta, significance), m, guesses_in,
                        guesses_out, correct, ceiling(m, delta, significance), significance)


def subsampled_gaussian_llr(observed: np.ndarray, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Each canary's log-likelihood ratio, in over out, from its per-step observations in units of the
    clipping bound ([steps, canaries]): out, an observation is N(0, sigma^2); in, the canary is also
    present with probability q, adding 1. Summed over steps: the Neyman-Pearson test of one canary
    against the subsampled Gaussian mechanism the ledger composes."""
    z = np.asarray(observed, np.float64)
    present = (z - 0.5) / noise_multiplier**2
    per_step = logsumexp(np.stack([np.zeros_like(z), present]), axis=0,
                         b=np.array([1 - sample_rate, sample_rate]).reshape(2, *([1] * z.ndim)))
    return per_step.sum(axis=0)


def ideal_scores(
    canaries: int, sample_rate: float, noise_multiplier: float, steps: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, inclusion) of canaries alone in the accounted mechanism: each in with probability 1/2,
    present at each step with rate q when in, observed through N(0, sigma^2) noise in units of the
    clipping bound. No real audit does better than these Dirac canaries with nothing else in their
    coordinates."""
    included = rng.random(canaries) < 0.5
    present = (rng.random((steps, canaries)) < sample_rate) & included
    observed = present + noise_multiplier * rng.standard_normal((steps, canaries))
    return subsampled_gaussian_llr(observed, sample_rate, noise_multiplier), included


def choose_guesses(
    canaries: int, sample_rate: float, noise_multiplier: float, steps: int, delta: float,
    significance: float = SIGNIFICANCE, trials: int = 5, seed: int = 0,
) -> tuple[int, int, float]:
    """(k+, k-, median bound) with the largest median bound over `trials` simulations of ideal canaries
    (`ideal_scores`) in the accounted mechanism. It depends on the ledger's mechanism only, never on
    the audited run's scores. Where no choice bounds epsilon above 0, every canary is guessed (half in,
    half out): the choice with the highest ceiling, should the run leak more than its ledger says."""
    rng = np.random.default_rng(seed)
    runs = [ideal_scores(canaries, sample_rate, noise_multiplier, steps, rng) for _ in range(trials)]
    counts = sorted({round(f * canaries) for f in GUESS_FRACTIONS})
    best = (canaries // 2, canaries - canaries // 2, 0.0)
    for k_in in counts:
        for k_out in counts:
            if k_in + k_out == 0 or k_in + k_out > canaries:
                continue
            bounds = [lower_bound(canaries, k_in + k_out, count_correct(s, inc, k_in, k_out), delta, significance)
                      for s, inc in runs]
            median = float(np.median(bounds))
            if median > best[2]:
                best = (k_in, k_out, median)
    return best
