"""DP-MERF: the released statistic's sensitivity, the noise it gets, and what the ledger records."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privbench.config import build
from privbench.context import RunContext, Task
from privbench.data import load, make_split
from privbench.dp import PrivacyLedger
from privbench.methods import METHODS, presets
from privbench.methods.dp_merf import SENSITIVITY, embedding_sum, random_features

DPMERF = METHODS.get("dp-merf")


def config(**changes):
    return build(DPMERF.Config, {**presets(DPMERF)["smoke"], "d_rff": 400, "epochs": 2, **changes})


@pytest.fixture(scope="module")
def members():
    train = load("mnist", "train")
    return train.subset(make_split(train.labels, 0).members[:300])


def frequencies(d_rff=400, n_pixels=784):
    return torch.randn(d_rff // 2, n_pixels, generator=torch.Generator().manual_seed(0)) / math.sqrt(105)


def test_random_features_have_unit_norm():
    x = torch.rand(50, 784)
    assert torch.allclose(random_features(x, frequencies()).norm(dim=1), torch.ones(50), atol=1e-5)


def test_removing_one_member_moves_the_release_by_exactly_the_sensitivity(members):
    w = frequencies()
    full = embedding_sum(members, w, 10)
    for index in (0, 17, len(members) - 1):
        keep = np.delete(np.arange(len(members)), index)
        change = (full - embedding_sum(members.subset(keep), w, 10)).norm()
        assert change.item() == pytest.approx(SENSITIVITY, rel=1e-5)


def test_release_counts_members_per_class(members):
    counts = embedding_sum(members, frequencies(), 10)[-10:]
    assert counts.tolist() == np.bincount(members.labels, minlength=10).tolist()


def fit(members, epsilon, seed=0):
    ledger = PrivacyLedger(epsilon, 1e-5)
    ctx = RunContext(Path("."), Path("."), torch.device("cpu"), seed, progress=False)
    synthesizer = DPMERF(config()).fit(Task(members, None, members.classes), ledger, ctx)
    return synthesizer, ledger


def test_fit_spends_the_target_in_one_recorded_release(members):
    _, ledger = fit(members, 2.0)
    assert [m.name for m in ledger.mechanisms] == ["mean-embedding"]
    mechanism = ledger.mechanisms[0]
    assert mechanism.sensitivity == pytest.approx(math.sqrt(2))
    assert 2.0 * 0.99 <= ledger.spent() <= 2.0 * (1 + 1e-6)


def test_noise_added_is_the_noise_accounted(members, monkeypatch):
    released = {}
    import privbench.methods.dp_merf as module

    real_release = module.release_gaussian

    def spy(ledger, mechanism, value, generator):
        out = real_release(ledger, mechanism, value, generator)
        released.update(value=value, out=out, mechanism=mechanism)
        return out

    monkeypatch.setattr(module, "release_gaussian", spy)
    _, ledger = fit(members, 1.0)
    noise = (released["out"] - released["value"]).numpy()
    assert released["mechanism"] is ledger.mechanisms[0]
    assert noise.std() == pytest.approx(ledger.mechanisms[0].noise_std, rel=0.03)
    assert abs(noise.mean()) < 0.05 * noise.std()


def test_more_privacy_means_more_noise(members):
    _, loose = fit(members, 10.0)
    _, tight = fit(members, 1.0)
    assert tight.mechanisms[0].noise_multiplier > 3 * loose.mechanisms[0].noise_multiplier


def test_samples_follow_the_private_class_mix_and_are_reproducible(members):
    synthesizer, _ = fit(members, math.inf)
    a = synthesizer.sample(500, generator=torch.Generator().manual_seed(3))
    b = synthesizer.sample(500, generator=torch.Generator().manual_seed(3))
    assert a.images.shape == (500, 28, 28, 1) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    expected = np.bincount(members.labels, minlength=10) / len(members)
    observed = np.bincount(a.labels, minlength=10) / 500
    assert np.abs(observed - expected).max() < 0.07  # eps = inf: the counts are exact


def test_requested_labels_are_honoured(members):
    synthesizer, _ = fit(members, 5.0)
    labels = np.repeat(np.arange(10), 3)
    assert synthesizer.sample(30, labels=labels).labels.tolist() == labels.tolist()


def test_restore_gives_the_same_samples(members):
    synthesizer, _ = fit(members, 5.0)
    ctx = RunContext(Path("."), Path("."), torch.device("cpu"), 0, progress=False)
    restored = DPMERF(config()).restore(synthesizer.state_dict(), Task(members, None, members.classes), ctx)
    first = synthesizer.sample(64, generator=torch.Generator().manual_seed(5))
    again = restored.sample(64, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(first.images, again.images)
