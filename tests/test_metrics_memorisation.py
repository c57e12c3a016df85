"""The memorisation score: a generator that returns members scores near 1, one that samples the
distribution without copying near the percentile's 0.05, and the interval covers the score."""

import numpy as np
import pytest

from privbench.metrics.memorisation import PERCENTILE, memorisation, nearest_distances


def gaussian(n, dim=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim))


@pytest.fixture(scope="module")
def population():
    return gaussian(500, seed=0), gaussian(500, seed=1)  # members, non-members


def test_nearest_distances():
    np.testing.assert_allclose(nearest_distances(np.array([[0.0], [5.0]]), np.array([[1.0], [3.0], [4.5]])), [1.0, 0.5])


def test_a_generator_that_returns_members_scores_near_one(population):
    members, non_members = population
    copies = members[np.random.default_rng(2).integers(len(members), size=400)]
    result = memorisation(copies, members, non_members)
    assert result.score == 1.0 and result.interval[0] > 0.99


def test_a_generator_that_copies_some_members_scores_their_share(population):
    members, non_members = population
    half = np.concatenate([members[:200], gaussian(200, seed=3)])
    result = memorisation(half, members, non_members)
    assert 0.5 < result.score < 0.6  # the copies, plus ~5 % of the fresh half
    assert result.interval[0] <= result.score <= result.interval[1]


def test_a_generator_that_samples_without_copying_scores_about_the_percentile(population):
    members, non_members = population
    result = memorisation(gaussian(1000, seed=4), members, non_members)
    assert result.expected == PERCENTILE / 100
    # Sampling error of the score (n = 1000) and of the threshold (500 non-members): a margin of ~4 sd.
    assert 0.01 < result.score < 0.12
    assert result.interval[0] <= result.score <= result.interval[1] and result.interval[1] - result.interval[0] < 0.1
