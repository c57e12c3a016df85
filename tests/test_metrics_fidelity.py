"""Precision and recall (Kynkäänniemi et al. 2019) on toy distributions, and the Inception Score's
formula and its refusal to report without logits weights."""

import numpy as np
import pytest
import torch

from privbench.errors import PrivbenchError
from privbench.metrics import inception_score as metrics_is
from privbench.metrics.precision_recall import (
    DENSITY_COVERAGE_K, density_coverage, kth_neighbour_radii, precision_recall, share_within,
)


def gaussian(n, dim=8, shift=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(shift, scale, size=(n, dim))


def test_radii_are_distances_to_the_kth_other_point():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(kth_neighbour_radii(points, 1), [1, 1, 2, 4])
    np.testing.assert_allclose(kth_neighbour_radii(points, 2), [3, 2, 3, 6])
    with pytest.raises(ValueError, match="k must lie in"):
        kth_neighbour_radii(points, 4)


def test_a_sphere_s_boundary_counts_as_inside():
    points, radii = np.array([[0.0], [10.0]]), np.array([1.0, 2.0])
    assert share_within(np.array([[1.0], [12.0], [5.0], [-1.5]]), points, radii) == 0.5


def test_same_distribution_gives_high_precision_and_recall():
    precision, recall = precision_recall(gaussian(500, seed=0), gaussian(500, seed=1), k=3)
    assert precision > 0.6 and recall > 0.6


def test_collapsed_samples_are_precise_but_do_not_recall():
    real = gaussian(500, seed=0)
    collapsed = gaussian(500, scale=0.05, seed=1)  # all near the mode of the real distribution
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision > 0.95 and recall < 0.2


def test_far_samples_are_neither_precise_nor_recalled():
    precision, recall = precision_recall(gaussian(300, seed=0), gaussian(300, shift=10.0, seed=1), k=3)
    assert precision == 0.0 and recall == 0.0


def test_larger_k_never_lowers_precision_or_recall():
    real, fake = gaussian(300, seed=0), gaussian(300, shift=0.7, seed=1)
    p3, r3 = precision_recall(real, fake, k=3)
    p5, r5 = precision_recall(real, fake, k=5)
    assert p5 >= p3 and r5 >= r3


def test_inception_score_of_uniform_and_of_confident_balanced_predictions():
    assert metrics_is.score_from_logits(np.zeros((100, 10))) == pytest.approx((1.0, 0.0))
    # Every image certain of its class, classes balanced within every split: IS = number of classes.
    confident = np.where(np.eye(10, dtype=bool)[np.arange(100) % 10], 50.0, 0.0)
    mean, std = metrics_is.score_from_logits(confident)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


class TinyLogits(torch.nn.Module):
    """A stand-in for an Inception-v3 with a head: the mean of each channel picks among 3 classes."""

    def forward(self, x):
        return 100 * x.mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_inception_score_needs_logits_weights_and_says_so(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    monkeypatch.delenv(metrics_is.LOGITS_ENV, raising=False)
    assert metrics_is.inception_score(images, progress=False) is None
    assert "no classification head" in metrics_is.UNAVAILABLE
    monkeypatch.setenv(metrics_is.LOGITS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(PrivbenchError, match="is not a file"):
        metrics_is.inception_score(images, progress=False)
    path = tmp_path / "logits.pt"
    torch.jit.script(TinyLogits()).save(str(path))
    monkeypatch.setenv(metrics_is.LOGITS_ENV, str(path))
    red = images.copy()
    red[..., 0], red[..., 1:] = 255, 0  # every image is certainly class 0: IS = 1
    assert metrics_is.inception_score(red, splits=2, progress=False)[0] == pytest.approx(1.0, abs=1e-6)
    thirds = np.zeros_like(images)
    for i in range(len(thirds)):
        thirds[i, ..., i % 3] = 255  # balanced and certain: IS = 3 within each split
    assert metrics_is.inception_score(thirds[:18], splits=2, progress=False)[0] == pytest.approx(3.0, rel=1e-4)


def test_density_and_coverage_by_hand():
    # Real points 0, 1, 3 on a line, k = 1: radii 1, 1, 2. Synthetic 0.5 lies in the spheres of 0 and 1,
    # 2.5 in the sphere of 3 only, 10 in none: density (2 + 1 + 0) / 3, coverage: every real sphere holds one.
    real, synthetic = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [2.5], [10.0]])
    assert density_coverage(real, synthetic, k=1) == pytest.approx((1.0, 1.0))
    # Both samples crowd into the spheres of 0 and 1: density 2, above 1, and sphere 3 left uncovered.
    assert density_coverage(real, np.array([[0.5], [0.6]]), k=1) == pytest.approx((2.0, 2 / 3))


@pytest.mark.parametrize("shift", [0.0, 0.5, 3.0])
def test_density_and_coverage_equal_the_authors_prdc(shift):
    prdc = pytest.importorskip("prdc")
    real, fake = gaussian(400, seed=0), gaussian(300, shift=shift, seed=1)
    theirs = prdc.compute_prdc(real, fake, nearest_k=DENSITY_COVERAGE_K)
    density, coverage = density_coverage(real, fake)
    # Continuous features have no ties at a sphere's boundary, where prdc's strict < and our <= differ.
    assert density == pytest.approx(theirs["density"], abs=1e-12)
    assert coverage == pytest.approx(theirs["coverage"], abs=1e-12)


def test_samples_crowding_one_mode_are_dense_but_do_not_cover():
    real = gaussian(500, seed=0)
    density, coverage = density_coverage(real, gaussian(500, scale=0.05, seed=1))
    same_density, same_coverage = density_coverage(real, gaussian(500, seed=2))
    assert density > 2 * same_density and coverage < 0.2 < 0.8 < same_coverage
    assert 0.7 < same_density < 1.3  # about 1 when the distributions agree (Naeem et al. 2020, Section 4)
