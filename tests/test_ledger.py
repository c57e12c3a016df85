"""The privacy ledger: reference epsilons, composition, calibration and refusal."""

import json
import math

import numpy as np
import pytest
import torch

from privbench.dp import Mechanism, PrivacyLedger, RepeatedReleases, compose, release_gaussian
from privbench.errors import PrivacyBudgetExceeded, PrivbenchError


def sgd(name="dp-sgd", sigma=1.5, q=0.04, steps=2250):
    return Mechanism(name, "dp-sgd", sigma, q, steps)


def test_rdp_matches_opacus_reference():
    # Opacus' accountants_test: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.32911117143.
    eps, used = compose([sgd()], 1e-5, "rdp")
    assert used == "rdp"
    assert eps == pytest.approx(7.32911117143, abs=1e-9)


def test_prv_matches_opacus_reference():
    # Opacus' PRV test counts int(90 // 0.04) steps, which is 2249 in floating point.
    eps, used = compose([sgd(steps=int(90 // 0.04))], 1e-5, "prv")
    assert used == "prv"
    assert eps == pytest.approx(6.777395712150674, abs=1e-6)


def test_gaussian_release_matches_closed_form():
    # One Gaussian release composes like the analytic Gaussian mechanism (Balle & Wang 2018):
    # delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s). PRV is tight to ~1%.
    from scipy.stats import norm

    s = 2.0
    eps, _ = compose([Mechanism("q", "gaussian", s)], 1e-5, "prv")
    delta = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
    assert delta == pytest.approx(1e-5, rel=0.1)


def test_composition_is_more_than_each_part():
    query = Mechanism("query", "gaussian", 5.0)
    alone, _ = compose([query], 1e-5)
    training, _ = compose([sgd(sigma=1.0, q=0.01, steps=500)], 1e-5)
    both, _ = compose([query, sgd(sigma=1.0, q=0.01, steps=500)], 1e-5)
    assert both > max(alone, training)
    assert both < alone + training  # basic composition is loose; the accountant is tighter


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 10.0])
def test_calibration_meets_target_from_below(accountant, target):
    ledger = PrivacyLedger(target, 1e-5, accountant)
    mech = ledger.calibrate("dp-sgd", "dp-sgd", sample_rate=0.02, steps=300)
    ledger.record(mech)
    spent = ledger.spent()
    assert target * 0.99 <= spent <= target * (1 + 1e-6)


def test_query_in_ledger_forces_more_dp_sgd_noise():
    fresh = PrivacyLedger(1.0, 1e-5)
    with_query = PrivacyLedger(1.0, 1e-5)
    with_query.record(Mechanism("query", "gaussian", 10.0, sensitivity=math.sqrt(5)))
    a = fresh.calibrate("dp-sgd", "dp-sgd", sample_rate=0.05, steps=200)
    b = with_query.calibrate("dp-sgd", "dp-sgd", sample_rate=0.05, steps=200)
    assert b.noise_multiplier > a.noise_multiplier
    with_query.record(b)
    assert with_query.spent() == pytest.approx(1.0, rel=0.01)
    assert with_query.spent() <= 1.0 * (1 + 1e-6)


def test_record_refuses_to_exceed_target():
    ledger = PrivacyLedger(1.0, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded, match="past the target"):
        ledger.record(Mechanism("too-little-noise", "gaussian", 0.5))
    assert ledger.mechanisms == []  # a refused mechanism leaves no trace


def test_calibrate_refuses_when_budget_is_gone():
    ledger = PrivacyLedger(2.0, 1e-5)
    ledger.record(ledger.calibrate("first", "gaussian", epsilon=1.0))
    with pytest.raises(PrivacyBudgetExceeded, match="nothing is left"):
        ledger.calibrate("more", "gaussian", epsilon=0.5)


def test_calibrating_into_a_nearly_spent_budget_needs_far_more_noise():
    ledger = PrivacyLedger(1.0, 1e-5)
    first = ledger.record(ledger.calibrate("first", "gaussian"))
    second = ledger.record(ledger.calibrate("second", "gaussian"))
    assert second.noise_multiplier > 3 * first.noise_multiplier
    assert ledger.spent() <= 1.0 * (1 + 1e-6)


def test_same_mechanism_cannot_be_recorded_twice():
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.record(Mechanism("q", "gaussian", 5.0))
    with pytest.raises(ValueError, match="already"):
        ledger.record(Mechanism("q", "gaussian", 5.0))


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_bad_epsilon_is_a_user_error(eps):
    with pytest.raises(PrivbenchError, match="epsilon must be > 0"):
        PrivacyLedger(eps, 1e-5)


@pytest.mark.parametrize("delta", [0.0, 1.0, 2.0])
def test_bad_delta_is_a_user_error(delta):
    with pytest.raises(PrivbenchError, match="delta"):
        PrivacyLedger(1.0, delta)


def test_infinite_epsilon_means_no_noise():
    ledger = PrivacyLedger(math.inf, 1e-5)
    mech = ledger.calibrate("dp-sgd", "dp-sgd", sample_rate=0.1, steps=10)
    assert mech.noise_multiplier == 0.0
    ledger.record(mech)
    assert ledger.spent() == math.inf


def test_prv_failure_falls_back_to_rdp(monkeypatch, caplog):
    import privbench.dp.ledger as ledger_module

    def broken(*args, **kwargs):
        raise ValueError("discretisation out of range")

    monkeypatch.setattr(ledger_module.PRVAccountant, "get_epsilon", broken)
    eps, used = compose([sgd()], 1e-5, "prv")
    assert used == "rdp"
    assert eps == pytest.approx(7.32911117143, abs=1e-9)
    assert "falling back to RDP" in caplog.text


# PRV's epsilon is the upper end of its error interval, at Opacus' default eps_error (get_epsilon).
PRV_EPS_ERROR = 0.01


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at `delta` of a Gaussian mechanism with shift mu (noise multiplier 1/mu): the root
    of delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu) (Balle & Wang, ICML 2018, Thm. 8)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps):
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    return brentq(excess, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize("sigma, steps", [(2.0, 1), (4.0, 10), (1.2, 5), (25.0, 11), (0.8, 20)])
def test_repeated_gaussian_releases_compose_like_one_gaussian_with_sigma_over_root_steps(sigma, steps):
    # T releases of multiplier sigma are exactly one Gaussian mechanism with mu = sqrt(T) / sigma
    # (Dong, Roth and Su 2022, Cor. 3.3): an accountant independent of the PRV one.
    exact = analytic_gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    eps, used = compose([Mechanism("vote", "gaussian", sigma, 1.0, steps)], 1e-5, "prv")
    assert used == "prv"
    assert exact - PRV_EPS_ERROR <= eps <= exact + 2 * PRV_EPS_ERROR
    assert compose([Mechanism("vote", "gaussian", sigma, 1.0, steps)], 1e-5, "rdp")[0] >= exact  # RDP bounds it


@pytest.mark.parametrize("target, steps", [(1.0, 10), (10.0, 11), (1.0, 5)])
def test_a_repeated_release_calibrates_to_the_exact_gaussian_epsilon(target, steps):
    ledger = PrivacyLedger(target, 1e-5)
    mechanism = ledger.calibrate("vote", "gaussian", steps=steps)
    assert (mechanism.steps, mechanism.sample_rate) == (steps, 1.0)
    exact = analytic_gaussian_epsilon(math.sqrt(steps) / mechanism.noise_multiplier, 1e-5)
    assert target * 0.995 - 2 * PRV_EPS_ERROR <= exact <= target + PRV_EPS_ERROR


def test_a_repeated_release_takes_what_the_earlier_mechanisms_leave():
    alone = PrivacyLedger(2.0, 1e-5).calibrate("vote", "gaussian", steps=10)
    ledger = PrivacyLedger(2.0, 1e-5)
    ledger.record(Mechanism("counts", "gaussian", 5.0))
    after = ledger.record(ledger.calibrate("vote", "gaussian", steps=10))
    assert after.noise_multiplier > alone.noise_multiplier
    # Both are Gaussian with q = 1: together one Gaussian with mu^2 = 1/5^2 + 10/sigma^2.
    exact = analytic_gaussian_epsilon(math.sqrt(1 / 5.0**2 + 10 / after.noise_multiplier**2), 1e-5)
    assert 2.0 * 0.995 - 2 * PRV_EPS_ERROR <= exact <= 2.0 + PRV_EPS_ERROR


def test_repeated_releases_add_the_recorded_noise_once_per_accounted_step():
    ledger = PrivacyLedger(1.0, 1e-5)
    mechanism = ledger.calibrate("vote", "gaussian", steps=4, sensitivity=1.0)
    releases = RepeatedReleases(ledger, mechanism, torch.Generator().manual_seed(0))
    assert ledger.mechanisms == [mechanism]
    noise = [releases.release(torch.zeros(50_000, dtype=torch.float64)) for step in releases]
    releases.finish()
    assert len(noise) == 4
    assert torch.cat(noise).std().item() == pytest.approx(mechanism.noise_std, rel=0.01)
    with pytest.raises(RuntimeError, match="already made"):
        next(iter(releases))
    short = RepeatedReleases(PrivacyLedger(1.0, 1e-5), mechanism, torch.Generator())
    steps = iter(short)
    next(steps)
    with pytest.raises(RuntimeError, match="step 1 was drawn but not released"):
        next(steps)
    with pytest.raises(RuntimeError, match="0 releases made, 4 accounted"):
        short.finish()
    with pytest.raises(ValueError, match="sample rate 1"):
        RepeatedReleases(PrivacyLedger(1.0, 1e-5), Mechanism("v", "gaussian", 3.0, 0.5, 4), torch.Generator())


def test_ledger_round_trips_through_json():
    ledger = PrivacyLedger(3.0, 1e-6, "rdp")
    ledger.record(Mechanism("q", "gaussian", 4.0, sensitivity=2.0))
    data = json.loads(json.dumps(ledger.to_dict()))
    again = PrivacyLedger.from_dict(data)
    assert again == ledger
    assert data["composed_epsilon"] == pytest.approx(ledger.spent())


def test_release_uses_the_recorded_noise():
    ledger = PrivacyLedger(1.0, 1e-5)
    mech = ledger.calibrate("stat", "gaussian", sensitivity=3.0)
    value = torch.zeros(200_000, dtype=torch.float64)
    noisy = release_gaussian(ledger, mech, value, torch.Generator().manual_seed(0))
    assert ledger.mechanisms == [mech]
    assert noisy.std().item() == pytest.approx(mech.noise_std, rel=0.01)
    assert mech.noise_std == pytest.approx(mech.noise_multiplier * 3.0)


def test_release_is_refused_before_any_noise_is_drawn():
    ledger = PrivacyLedger(1.0, 1e-5)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(PrivacyBudgetExceeded):
        release_gaussian(ledger, Mechanism("x", "gaussian", 0.1), torch.zeros(3), gen)
    assert torch.equal(gen.get_state(), state)
    np.testing.assert_array_equal(ledger.mechanisms, [])


def test_prv_is_skipped_where_its_grid_would_explode():
    # sigma 0.05 made PRV allocate gigabytes; RDP's bound is astronomically past any target there.
    eps, used = compose([sgd(sigma=0.05, q=0.02, steps=300)], 1e-5, "prv")
    assert used == "rdp"
    assert eps > 50
