"""Audit arithmetic against hand-computed ROCs, the bootstrap, and the Clopper-Pearson bound."""

import math

import numpy as np
import pytest

from privbench.attacks.audit import (
    FPR_TARGETS, audit, auc, bootstrap_intervals, clopper_pearson_upper, epsilon_lower_bound, roc, roc_plot,
    tpr_at_fpr,
)


def test_roc_by_hand_with_ties():
    # members 3, 2, 2, 0; non-members 2, 1, 0, 0. Thresholds inf, 3, 2, 1, 0.
    fpr, tpr, thresholds = roc(np.array([3, 2, 2, 0]), np.array([2, 1, 0, 0]))
    np.testing.assert_array_equal(thresholds, [np.inf, 3, 2, 1, 0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.75, 0.75, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.5, 1])
    assert tpr_at_fpr(fpr, tpr, 0.1) == 0.25  # the tie at 2 moves both rates together: no 0.75 at FPR 0
    assert tpr_at_fpr(fpr, tpr, 0.25) == 0.75
    # AUC = P(member > non-member) + P(tie) / 2 over the 16 pairs: 10 wins, 4 ties -> 12 / 16.
    assert auc(fpr, tpr) == pytest.approx(12 / 16)


def test_all_equal_scores_are_chance():
    fpr, tpr, _ = roc(np.zeros(50), np.zeros(50))
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])
    assert all(tpr_at_fpr(fpr, tpr, t) == 0 for t in FPR_TARGETS)
    assert auc(fpr, tpr) == 0.5
    assert epsilon_lower_bound(np.zeros(50), np.zeros(50), 1e-5).epsilon == 0


def test_perfect_separation():
    members, non_members = np.arange(100, 200), np.arange(100)
    fpr, tpr, _ = roc(members, non_members)
    assert auc(fpr, tpr) == 1 and all(tpr_at_fpr(fpr, tpr, t) == 1 for t in FPR_TARGETS)
    # With 100 + 100 samples and no error, the bound is limited by the sample size alone:
    # FPR_hi = FNR_hi = 1 - 0.025^(1/100) = 0.0362, eps_lb = ln((1 - 0.0362) / 0.0362) = 3.28.
    bound = epsilon_lower_bound(members, non_members, 0.0)
    assert bound.fpr_upper == pytest.approx(1 - 0.025 ** (1 / 100))
    assert bound.epsilon == pytest.approx(math.log((0.025 ** 0.01) / (1 - 0.025 ** 0.01)), rel=1e-9)


def test_clopper_pearson_worked_example():
    # 1000 members, 1000 non-members, TP 300, FP 10, delta 0 (the worked example).
    members = np.r_[np.ones(300), np.zeros(700)]
    non_members = np.r_[np.ones(10), np.zeros(990)]
    bound = epsilon_lower_bound(members, non_members, 0.0)
    assert bound.threshold == 1
    assert bound.fpr_upper == pytest.approx(0.0183, abs=5e-5)
    assert bound.fnr_upper == pytest.approx(0.7283, abs=5e-5)
    assert bound.epsilon == pytest.approx(2.70, abs=0.005)
    assert clopper_pearson_upper(1000, 1000) == 1.0


def test_bootstrap_intervals_cover_and_shrink_with_size():
    rng = np.random.default_rng(0)
    small = bootstrap_intervals(rng.normal(1, 1, 100), rng.normal(0, 1, 100), 300, np.random.default_rng(1))
    large = bootstrap_intervals(rng.normal(1, 1, 2000), rng.normal(0, 1, 2000), 300, np.random.default_rng(1))
    true_auc = 0.7602  # Phi(1 / sqrt(2)) for unit-variance normals one apart
    for (lo, hi), _ in (small, large):
        assert lo < true_auc < hi
    assert large[0][1] - large[0][0] < (small[0][1] - small[0][0]) / 2
    lo, hi = large[1][0.1]
    assert lo < 0.389 < hi  # TPR at FPR 0.1: 1 - Phi(1.2816 - 1) = 0.389


def test_audit_result_and_plot():
    rng = np.random.default_rng(0)
    result = audit("toy", rng.normal(0.5, 1, 300), rng.normal(0, 1, 300), 1e-5, resamples=200)
    data = result.to_dict()
    assert data["members"] == data["non_members"] == 300
    assert set(data["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    lo, hi = data["tpr_at_fpr"]["0.1"]["interval"]
    assert lo <= data["tpr_at_fpr"]["0.1"]["tpr"] <= hi
    png = roc_plot({"toy": roc(rng.normal(0.5, 1, 300), rng.normal(0, 1, 300))[:2]}, "toy")
    assert png.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="non-finite"):
        audit("bad", np.array([np.nan, 1.0]), np.array([0.0, 1.0]), 1e-5)
