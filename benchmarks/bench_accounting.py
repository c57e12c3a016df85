"""Noise calibration of a paper-sized DP-SGD phase by the PrivacyLedger, with each accountant.

The phase is DPImageBench's CIFAR-10 setting (methods/diffusion.yaml, paper preset): expected batch
4096 of 45,000 members (the train split less validation), 150 epochs, i.e. q = 0.091 and 1,648
steps, calibrated to epsilon 1 and 10 at delta 1e-5. One timed call is `PrivacyLedger.calibrate`
from an empty ledger: RDP bisection, then (PRV) refinement with PRV evaluations. The result is
checked like the ledger promises: composed epsilon within the calibration tolerance below target.
"""

from __future__ import annotations

import pytest

from privbench.dp.ledger import CALIBRATION_TOLERANCE, PrivacyLedger, compose

DELTA = 1e-5
MEMBERS, LOGICAL_BATCH, EPOCHS = 45_000, 4096, 150
Q = LOGICAL_BATCH / MEMBERS
STEPS = round(EPOCHS / Q)  # as train_dp_sgd converts epochs to steps


@pytest.mark.parametrize("epsilon", [1.0, 10.0])
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrate_paper_dp_sgd_phase(benchmark, accountant, epsilon):
    def calibrate():
        ledger = PrivacyLedger(epsilon, DELTA, accountant=accountant)
        return ledger.calibrate("dp-sgd", "dp-sgd", sample_rate=Q, steps=STEPS)

    benchmark.group = "accounting: calibrate a paper DP-SGD phase"
    mechanism = benchmark.pedantic(calibrate, rounds=3, iterations=1, warmup_rounds=0)
    spent, used = compose([mechanism], DELTA, accountant)
    benchmark.extra_info |= {"noise_multiplier": mechanism.noise_multiplier, "epsilon": spent, "steps": STEPS}
    assert used == accountant, f"{accountant} fell back to {used}"
    assert epsilon * (1 - CALIBRATION_TOLERANCE) <= spent <= epsilon
    assert (mechanism.sample_rate, mechanism.steps) == (Q, STEPS)
