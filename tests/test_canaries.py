"""The canary audit: the one-run bound itself, and privbench check catching planted accounting bugs in
canary runs of DP-GAN's smoke discriminator through the harness."""

import json

import numpy as np
import pytest

import privbench.dp.sgd as sgd
from privbench.attacks.one_run import (
    ceiling, choose_guesses, count_correct, ideal_scores, lower_bound, one_run_audit, p_value,
)
from privbench.cli import main
from privbench.config import parse_overrides, resolve
from privbench.dp.ledger import PrivacyLedger
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.metrics.names import CANARY_FAILURES, EPS_LB_CANARY
from privbench.store import Store

# jax_privacy.auditing._epsilon_one_run(0, canaries, guesses, correct, 0.05, delta) of pip's jax-privacy
# 2.0.0 (google-deepmind/jax_privacy; Steinke et al.'s bound with their delta term), run once in a
# separate environment: an implementation written independently of attacks/one_run.py.
JAX_PRIVACY_BOUNDS = {
    (1000, 1000, 1000, 0.0): 5.8090683371730325,
    (1000, 100, 90, 0.0): 1.6308231927421464,
    (1000, 100, 90, 1e-5): 1.6261436787042223,
    (5000, 300, 200, 1e-5): 0.4816081751674781,
    (100, 100, 100, 1e-5): 3.4902158675692982,
    (5000, 234, 200, 1e-5): 1.4497450544247266,
}


@pytest.mark.parametrize(("canaries", "guesses", "correct", "delta"), list(JAX_PRIVACY_BOUNDS))
def test_the_one_run_bound_matches_jax_privacy(canaries, guesses, correct, delta):
    assert lower_bound(canaries, guesses, correct, delta) == pytest.approx(
        JAX_PRIVACY_BOUNDS[canaries, guesses, correct, delta], abs=1e-4)


@pytest.mark.parametrize(("guesses", "correct"), [(100, 90), (400, 260), (1000, 1000)])
def test_without_delta_the_bound_is_the_clopper_pearson_bound_on_the_guesses_precision(guesses, correct):
    """With delta = 0, epsilon is rejected where the guesses' precision exceeds e^eps / (1 + e^eps) at
    95%: the logit of the one-sided Clopper-Pearson lower bound on the precision."""
    from scipy.stats import beta

    precision_low = beta.ppf(0.05, correct, guesses - correct + 1)
    assert lower_bound(10_000, guesses, correct, 0.0) == pytest.approx(np.log(precision_low / (1 - precision_low)), abs=1e-5)


def test_the_bound_is_the_largest_epsilon_the_guesses_reject():
    eps = lower_bound(1000, 200, 150, 1e-5)
    assert p_value(1000, 200, 150, eps, 1e-5) <= 0.05 < p_value(1000, 200, 150, eps + 1e-3, 1e-5)
    assert lower_bound(1000, 200, 100, 1e-5) == 0.0  # chance-level guessing proves nothing
    assert ceiling(100, 1e-5) < ceiling(1000, 1e-5) < ceiling(5000, 1e-5)


def test_guesses_count_the_top_as_in_and_the_bottom_as_out():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert count_correct(scores, included, 2, 2) == 1 + 1  # top two: one in; bottom two: one out
    result = one_run_audit(scores, included, 1e-5, 1, 0)
    assert (result.correct, result.guesses_in, result.guesses_out) == (1, 1, 0)


def test_the_bound_holds_on_an_exactly_eps_dp_mechanism():
    """Randomized response with eps = 1 on 400 canaries, every canary guessed: the 95% bound may exceed 1
    in at most 5% of runs (10% allowed here: 200 runs put the chance of more than 20 at ~1e-3 if 5% holds)."""
    rng = np.random.default_rng(0)
    eps, m, runs = 1.0, 400, 200
    right = rng.random((runs, m)) < np.exp(eps) / (1 + np.exp(eps))
    above = sum(lower_bound(m, m, int(r.sum()), 0.0) > eps for r in right)
    assert above <= 20


def test_ideal_canaries_stay_below_the_accounted_epsilon():
    ledger = PrivacyLedger(2.0, 1e-5)
    mechanism = ledger.calibrate("dp-sgd", "dp-sgd", sample_rate=0.1, steps=50, sensitivity=1.0)
    k_in, k_out, median = choose_guesses(2000, 0.1, mechanism.noise_multiplier, 50, 1e-5)
    assert 0 < median < 2.0 and k_in + k_out > 0
    scores, included = ideal_scores(2000, 0.1, mechanism.noise_multiplier, 50, np.random.default_rng(1))
    assert one_run_audit(scores, included, 1e-5, k_in, k_out).epsilon < 2.0


# DP-GAN at eps 10 on the smoke preset, its discriminator trained for 5 epochs (35 noisy steps at q
# 0.14, sigma ~1.6) instead of 20, so that a run takes seconds. Its clipping bound is 0.001 (DPImageBench's),
# so the canary examples' gradients are ~1e5 C.
CANARY_SETTINGS = ["audit.canaries=5000", "audit.canary_examples=32", "params.epochs=5"]


def _noise_divided_by_ten(monkeypatch):
    class Optimizer(sgd.DPOptimizer):
        def add_noise(self):
            noise_multiplier, self.noise_multiplier = self.noise_multiplier, self.noise_multiplier / 10
            super().add_noise()
            self.noise_multiplier = noise_multiplier

    monkeypatch.setattr(sgd, "DPOptimizer", Optimizer)


def _no_clipping(monkeypatch):
    class Optimizer(sgd.DPOptimizer):
        def clip_and_accumulate(self):
            bound, self.max_grad_norm = self.max_grad_norm, float("inf")
            super().clip_and_accumulate()
            self.max_grad_norm = bound

    monkeypatch.setattr(sgd, "DPOptimizer", Optimizer)


def _one_layer_unclipped(monkeypatch):
    """The parameter tensor with the largest per-example gradients summed without clipping (the others
    clipped as usual)."""

    class Optimizer(sgd.DPOptimizer):
        def clip_and_accumulate(self):
            layer = max(self.params, key=lambda p: p.grad_sample.reshape(len(p.grad_sample), -1).norm(dim=1).mean())
            before = layer.summed_grad
            unclipped = layer.grad_sample.sum(0)
            super().clip_and_accumulate()
            layer.summed_grad = unclipped if before is None else before + unclipped

    monkeypatch.setattr(sgd, "DPOptimizer", Optimizer)


def _accountant_told_half_the_sample_rate(monkeypatch):
    calibrate = PrivacyLedger.calibrate

    def told_half(self, name, kind, **kwargs):
        if kind == "dp-sgd":
            kwargs["sample_rate"] /= 2
        return calibrate(self, name, kind, **kwargs)

    monkeypatch.setattr(PrivacyLedger, "calibrate", told_half)


PLANTED_BUGS = {
    "noise divided by 10": _noise_divided_by_ten,
    "no clipping": _no_clipping,
    "one layer unclipped": _one_layer_unclipped,
    "accountant told half the sample rate": _accountant_told_half_the_sample_rate,
}


def _canary_run(tmp_path, capsys):
    from privbench.harness import run

    config = resolve(METHODS.get("dp-gan"), "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(CANARY_SETTINGS))
    store = Store(tmp_path)
    row = run(config, store, progress=False)
    capsys.readouterr()
    code = main(["check", "--out", str(tmp_path)])
    return row, store, code, capsys.readouterr().out


@pytest.mark.parametrize("bug", list(PLANTED_BUGS))
def test_privbench_check_flags_a_planted_accounting_bug(bug, tmp_path, monkeypatch, capsys):
    PLANTED_BUGS[bug](monkeypatch)
    row, store, code, out = _canary_run(tmp_path, capsys)
    assert code == 1, out
    assert "ACCOUNTING FAILURE" in out and row["run_id"] in out


def test_an_honest_canary_run_passes_check_and_is_never_scored(tmp_path, capsys):
    row, store, code, out = _canary_run(tmp_path, capsys)
    assert code == 0, out
    assert 9.9 <= row["epsilon"] <= 10.0 + 1e-6 and row[EPS_LB_CANARY] <= row["epsilon"]
    assert row[CANARY_FAILURES] == 0
    run_dir = store.run_dir(row["run_id"])
    report = json.loads((run_dir / "canaries.json").read_text())
    assert set(report["threat_models"]) == {"gradient", "example", "final-model"}
    checks = report["mechanism_checks"]["checks"]
    assert checks["sample_rate"]["interval"][0] <= checks["sample_rate"]["recorded"] <= checks["sample_rate"]["interval"][1]
    assert checks["influence"]["unclipped_norm_ratio"] > 100  # the canary examples are clipped hard
    assert not (run_dir / "samples.npz").exists() and "fid" not in row  # trained with canaries: never scored
    assert "sample" not in set(store.costs()["stage"])
    assert main(["table", "--out", str(tmp_path), "--canaries"]) == 0
    table = capsys.readouterr().out
    assert "dp-gan" in table and "ideal" in table and "‖sum‖" in table and "FAILED" not in table
    assert main(["table", "--out", str(tmp_path)]) == 2  # never on a leaderboard
    assert "no finished runs" in capsys.readouterr().err
    with pytest.raises(PrivbenchError, match="canary run"):
        from privbench.harness import reaudit

        reaudit(store, row["run_id"], None)


def test_canaries_are_refused_where_there_is_no_dp_sgd_to_audit():
    with pytest.raises(PrivbenchError, match="dp-merf has none"):
        resolve(METHODS.get("dp-merf"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["audit.canaries=100"]))
    with pytest.raises(PrivbenchError, match="eps = inf"):
        resolve(METHODS.get("dpdm"), "mnist", float("inf"), 0, "smoke", "cpu", parse_overrides(["audit.canaries=100"]))
    with pytest.raises(PrivbenchError, match="audit.canaries"):
        resolve(METHODS.get("dpdm"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["audit.canaries=3"]))


def test_canaries_leave_the_config_hash_of_runs_without_them():
    plain = resolve(METHODS.get("dpdm"), "mnist", 1.0, 0, "smoke", "cpu", {})
    zero = resolve(METHODS.get("dpdm"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["audit.canaries=0"]))
    audited = resolve(METHODS.get("dpdm"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["audit.canaries=100"]))
    assert plain.digest() == zero.digest() != audited.digest()
