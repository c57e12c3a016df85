"""The privacy ledger: reference epsilons, composition, calibration and refusal."""

import json
import math

import numpy as np
import pytest
import torch

from privbench.dp import Mechanism, PrivacyLedger, compose, release_gaussian
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
