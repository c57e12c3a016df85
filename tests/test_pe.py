"""Private Evolution: one member moves each iteration's vote histogram by at most the sensitivity the
ledger was given, the T votes are one Gaussian mechanism with T steps that composes to the target,
the noise added is the noise accounted, and a run goes end to end."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privbench.config import build, parse_overrides, resolve
from privbench.context import RunContext, Task
from privbench.data import load, make_split
from privbench.dp import PrivacyLedger, RepeatedReleases
from privbench.errors import PrivbenchError
from privbench.harness import run
from privbench.methods import METHODS, presets
from privbench.methods.pe import SENSITIVITY, PESynthesizer, pixel_features, resample, selection_weights, vote_histogram
from privbench.store import Store

CPU = torch.device("cpu")
# Real settings at a size that fits seconds on a 2-core CPU: 2 votes over 4 candidates per class.
TINY = {"pretrain": {"steps": 3, "batch_size": 16}, "population": 4, "lookahead": 1, "variation_degrees": [7, 8],
        "sampler_steps": 10, "batch_size": 40}


@pytest.fixture(scope="module")
def task():
    train = load("mnist", "train")
    members = train.subset(make_split(train.labels, 0).members[:300])
    return Task(members, load("glyphs", "train", size=62 * 5), train.classes)


def features(task):
    return pixel_features(task.members.images, CPU, False), torch.from_numpy(task.members.labels)


def candidates(seed, n_classes=10, population=25):
    """Candidate features [classes, population, 784]: random images, and averages of a few (lookahead)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_classes, population, 3, 784, generator=g).mean(dim=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removing_or_adding_one_member_moves_the_histogram_by_exactly_one_vote(task, seed):
    x, y = features(task)
    pool = candidates(seed)
    full = vote_histogram(x, y, pool)
    assert full.sum().item() == len(x) and full.shape == (10 * 25,)
    rng = np.random.default_rng(seed)
    for index in rng.choice(len(x), 40, replace=False):
        keep = torch.from_numpy(np.delete(np.arange(len(x)), index))
        change = full - vote_histogram(x[keep], y[keep], pool)
        assert change.norm().item() == pytest.approx(SENSITIVITY, abs=1e-12)  # one vote, worth 1
        assert change.abs().max().item() == 1.0
    # Adding a copy of a member (the worst case for a nearest-neighbour vote) or a member of another
    # class moves one count of the new member's own class by one.
    for index, label in ((5, None), (7, (int(y[7]) + 3) % 10)):
        extra_y = y[index : index + 1] if label is None else torch.tensor([label])
        change = vote_histogram(torch.cat([x, x[index : index + 1]]), torch.cat([y, extra_y]), pool) - full
        moved = change.nonzero().flatten()
        assert change.norm().item() == pytest.approx(SENSITIVITY, abs=1e-12) and len(moved) == 1
        assert moved.item() // 25 == int(extra_y)


def test_a_member_votes_only_among_its_own_class_candidates():
    pool = torch.zeros(2, 3, 4)
    pool[1, 2] = 1.0  # class 1's last candidate sits exactly on the member, who is of class 0
    pool[0, 1] = 0.8
    histogram = vote_histogram(torch.ones(1, 4), torch.tensor([0]), pool)
    assert histogram.tolist() == [0, 1, 0, 0, 0, 0]


def test_the_threshold_floors_counts_and_a_class_without_survivors_draws_uniformly():
    noisy = torch.tensor([[5.0, 1.0, -3.0, 2.5], [0.5, 1.0, -1.0, 2.0]], dtype=torch.float64)
    weights = selection_weights(noisy, 2.0)
    assert weights.tolist() == [[3.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
    drawn = torch.stack([resample(weights, torch.Generator().manual_seed(s)) for s in range(300)])
    assert set(drawn[:, 0].flatten().tolist()) == {0, 3}
    assert set(drawn[:, 1].flatten().tolist()) == {0, 1, 2, 3}
    assert (drawn[:, 0] == 0).float().mean().item() == pytest.approx(3 / 3.5, abs=0.03)


def fit(task, epsilon, releases_seen=None):
    Method = METHODS.get("pe")
    config = build(Method.Config, {**presets(Method)["smoke"], **TINY, "pretrain": {**presets(Method)["smoke"]["pretrain"],
                                                                                   **TINY["pretrain"]}})
    ledger = PrivacyLedger(epsilon, 1e-5)
    ctx = RunContext(Path("."), Path(".cache-test-pe"), CPU, 0, progress=False)
    return Method(config).fit(task, ledger, ctx), ledger, config


@pytest.fixture(scope="module")
def fitted(task, tmp_path_factory):
    """One fit at eps 2 with every release recorded: (synthesizer, ledger, config, releases)."""
    made = []
    real = RepeatedReleases.release

    def spy(self, value):
        out = real(self, value)
        made.append((value.clone(), out, self.mechanism))
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("pe"))
        patch.setattr(RepeatedReleases, "release", spy)
        synthesizer, ledger, config = fit(task, 2.0)
    return synthesizer, ledger, config, made


def test_the_votes_are_one_gaussian_mechanism_with_t_steps_composing_to_the_target(fitted):
    _, ledger, config, made = fitted
    (mechanism,) = ledger.mechanisms
    assert (mechanism.kind, mechanism.sample_rate, mechanism.steps) == ("gaussian", 1.0, len(config.variation_degrees))
    assert mechanism.sensitivity == SENSITIVITY
    assert 2.0 * 0.99 <= ledger.spent() <= 2.0 * (1 + 1e-6)


def test_each_iteration_releases_the_member_votes_with_the_accounted_noise(fitted, task):
    _, ledger, config, made = fitted
    assert len(made) == len(config.variation_degrees)
    assert all(mechanism is ledger.mechanisms[0] for _, _, mechanism in made)
    assert all(value.sum().item() == len(task.members) and value.numel() == 10 * config.population for value, _, _ in made)
    noise = torch.cat([out - value for value, out, _ in made])
    # 80 draws: the sample std lies within 30% of the accounted one with overwhelming probability.
    assert noise.std().item() == pytest.approx(ledger.mechanisms[0].noise_std, rel=0.3)


def test_without_privacy_the_votes_are_released_as_they_are(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = []
    real = RepeatedReleases.release
    monkeypatch.setattr(RepeatedReleases, "release", lambda self, value: made.append((value, real(self, value))) or made[-1][1])
    _, ledger, _ = fit(task, math.inf)
    assert ledger.mechanisms[0].noise_multiplier == 0 and math.isinf(ledger.spent())
    assert all(torch.equal(value, out) for value, out in made)


def test_samples_come_from_the_final_population_honour_labels_and_survive_a_restore(fitted, task):
    synthesizer, _, config, _ = fitted
    assert synthesizer.population.shape == (10, config.population, 28, 28, 1)
    labels = np.repeat(np.arange(10), config.population)
    drawn = synthesizer.sample(len(labels), labels=labels, generator=torch.Generator().manual_seed(0))
    assert drawn.labels.tolist() == labels.tolist()
    for c in range(10):  # up to the population, without replacement: each candidate once
        got = sorted(map(bytes, drawn.images[labels == c]))
        assert got == sorted(map(bytes, synthesizer.population[c]))
    restored = METHODS.get("pe")(config).restore(synthesizer.state_dict(), task, None)
    a = synthesizer.sample(50, generator=torch.Generator().manual_seed(4))
    b = restored.sample(50, generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(a.images, b.images)
    assert isinstance(restored, PESynthesizer) and restored.capabilities == frozenset()


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "celeba64"])
@pytest.mark.parametrize("preset", ["smoke", "cpu", "small", "paper"])
def test_the_apis_model_is_pdp_diffusion_s_so_its_pre_training_cache_is_shared(preset, dataset):
    pe = resolve(METHODS.get("pe"), dataset, 10.0, 0, preset, "cpu", {}).params
    pdp = resolve(METHODS.get("pdp-diffusion"), dataset, 10.0, 0, preset, "cpu", {}).params
    if preset == "smoke":  # smoke's is smaller than PDP-Diffusion's: its pre-training must fit a smoke cell
        assert pe.unet == resolve(METHODS.get("pdp-diffusion"), dataset, 10.0, 0, "cpu", "cpu", {}).params.unet
    else:
        assert (pe.unet, pe.pretrain) == (pdp.unet, pdp.pretrain)


def test_a_smoke_run_goes_end_to_end(tmp_path):
    sets = ["params.pretrain.steps=3", "params.population=4", "params.lookahead=1", "params.variation_degrees=7,8",
            "eval.samples=60", "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1"]
    config = resolve(METHODS.get("pe"), "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(sets))
    row = run(config, Store(tmp_path), progress=False)
    assert 9.9 <= row["epsilon"] <= 10.0 * (1 + 1e-6)
    assert row["fid"] > 0 and 0 <= row["ca"] <= 1


def test_a_network_that_does_not_fit_the_side_is_refused_before_any_work():
    with pytest.raises(PrivbenchError, match="attention_resolutions' has 7, which is no level of the UNet at 16 px"):
        resolve(METHODS.get("pe"), "cifar10", 10.0, 0, "cpu", "cpu", parse_overrides(["params.unet.attention_resolutions=7"]))
