"""The mean-embedding family (DP-MERF, DP-Kernel, DP-NTK): unit-norm features, so that one member
moves the released sum by exactly the sensitivity; the noise used is the noise accounted; DP-Kernel's
repeated subsampled releases are the releases the ledger composes; and each method runs end to end."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from privbench.config import build, parse_overrides, resolve
from privbench.context import RunContext, Task
from privbench.data import load, make_split
from privbench.dp import PrivacyLedger, SubsampledReleases
from privbench.harness import run
from privbench.methods import METHODS, presets
from privbench.methods.dp_kernel import mixture_frequencies
from privbench.methods.dp_merf import RandomFourierFeatures, draw_frequencies
from privbench.methods.dp_ntk import TangentFeatures, tangent_network
from privbench.methods import mean_embedding
from privbench.methods.mean_embedding import SENSITIVITY, embedding_sum
from privbench.store import Store

CPU = torch.device("cpu")
PIXELS = 784
# Small settings per method: a fit in seconds on 2 CPU cores.
SMALL = {
    "dp-merf": {"d_rff": 400, "epochs": 2},
    "dp-kernel": {"d_rff": 400, "steps": 30, "member_batch": 60},
    "dp-ntk": {"ntk_widths": [40], "steps": 30, "batch_size": 50},
}


def feature_maps():
    g = torch.Generator().manual_seed(0)
    return {
        "dp-merf": RandomFourierFeatures(draw_frequencies(400, 105.0, PIXELS, g)),
        "dp-kernel": RandomFourierFeatures(mixture_frequencies((2.5, 5.0, 10.0, 20.0), 400, PIXELS, g)),
        "dp-ntk (fc_1l)": TangentFeatures(tangent_network(PIXELS, (40,), 10)),
        "dp-ntk (fc_2l)": TangentFeatures(tangent_network(PIXELS, (16, 24), 10)),
    }


@pytest.fixture(scope="module")
def members():
    train = load("mnist", "train")
    return train.subset(make_split(train.labels, 0).members[:300])


@pytest.mark.parametrize("name", list(feature_maps()))
def test_every_image_has_a_feature_vector_of_norm_one(name):
    phi = feature_maps()[name]
    x = torch.rand(20, PIXELS)
    norms = [phi.embed(x[i : i + 1], torch.ones(1, 1)).norm().item() for i in range(len(x))]
    assert norms == pytest.approx([1.0] * len(x), abs=1e-5)


@pytest.mark.parametrize("name", list(feature_maps()))
def test_removing_one_member_moves_the_release_by_exactly_the_sensitivity(members, name):
    phi = feature_maps()[name]
    full = embedding_sum(members, phi, 10, CPU)
    for index in (0, 17, len(members) - 1):
        keep = np.delete(np.arange(len(members)), index)
        change = (full - embedding_sum(members.subset(keep), phi, 10, CPU)).norm()
        assert change.item() == pytest.approx(SENSITIVITY, rel=1e-4)
    assert full[-10:].tolist() == np.bincount(members.labels, minlength=10).tolist()


@pytest.mark.parametrize("widths", [(40,), (16, 24)])
def test_tangent_features_are_the_normalised_parameter_gradients(widths):
    network = tangent_network(64, widths, 7)
    weights = {name: p.detach() for name, p in network.named_parameters()}
    x = torch.rand(6, 64)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 0, 1]), 3).float()
    gradients = vmap(grad(lambda w, xi: functional_call(network, w, (xi[None],)).sum()), in_dims=(None, 0))(weights, x)
    g = torch.cat([t.flatten(1) for t in gradients.values()], dim=1)
    expected = (g / g.norm(dim=1, keepdim=True)).T @ labels
    torch.testing.assert_close(TangentFeatures(network).embed(x, labels), expected, atol=1e-6, rtol=1e-5)


def test_the_tangent_embedding_of_generated_images_is_differentiable():
    phi = TangentFeatures(tangent_network(64, (40,), 10))
    x = torch.rand(8, 64, requires_grad=True)
    phi.embed(x, torch.ones(8, 1)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def fit(method, members, epsilon, seed=0):
    Method = METHODS.get(method)
    config = build(Method.Config, {**presets(Method)["smoke"], **SMALL[method]})
    ledger = PrivacyLedger(epsilon, 1e-5)
    ctx = RunContext(Path("."), Path("."), CPU, seed, progress=False)
    return Method(config).fit(Task(members, None, members.classes), ledger, ctx), ledger, config


@pytest.mark.parametrize("method", SMALL)
def test_the_fit_spends_the_target_in_the_mechanism_it_records(members, method):
    _, ledger, config = fit(method, members, 2.0)
    (mechanism,) = ledger.mechanisms
    assert mechanism.kind == "gaussian" and mechanism.sensitivity == pytest.approx(math.sqrt(2))
    if method == "dp-kernel":
        assert (mechanism.sample_rate, mechanism.steps) == (config.member_batch / len(members), config.steps)
    else:
        assert (mechanism.sample_rate, mechanism.steps) == (1.0, 1)
    assert 2.0 * 0.99 <= ledger.spent() <= 2.0 * (1 + 1e-6)


@pytest.mark.parametrize("method", SMALL)
def test_samples_follow_the_class_mix_honour_labels_and_survive_a_restore(members, method):
    synthesizer, _, config = fit(method, members, math.inf)
    a = synthesizer.sample(500, generator=torch.Generator().manual_seed(3))
    assert a.images.shape == (500, 28, 28, 1) and a.images.dtype == np.uint8
    expected = np.bincount(members.labels, minlength=10) / len(members)
    assert np.abs(np.bincount(a.labels, minlength=10) / 500 - expected).max() < 0.08
    labels = np.repeat(np.arange(10), 3)
    assert synthesizer.sample(30, labels=labels).labels.tolist() == labels.tolist()
    ctx = RunContext(Path("."), Path("."), CPU, 0, progress=False)
    restored = METHODS.get(method)(config).restore(synthesizer.state_dict(), Task(members, None, members.classes), ctx)
    first = synthesizer.sample(64, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(first.images, restored.sample(64, generator=torch.Generator().manual_seed(5)).images)


@pytest.mark.parametrize("method", ["dp-merf", "dp-ntk"])
def test_the_one_release_adds_the_noise_accounted(members, method, monkeypatch):
    released = {}
    real_release = mean_embedding.release_gaussian

    def spy(ledger, mechanism, value, generator):
        out = real_release(ledger, mechanism, value, generator)
        released.update(value=value, out=out, mechanism=mechanism)
        return out

    monkeypatch.setattr(mean_embedding, "release_gaussian", spy)
    _, ledger, _ = fit(method, members, 1.0)
    noise = (released["out"] - released["value"]).numpy()
    assert released["mechanism"] is ledger.mechanisms[0]
    assert noise.std() == pytest.approx(ledger.mechanisms[0].noise_std, rel=0.03)
    assert abs(noise.mean()) < 0.05 * noise.std()


@pytest.mark.parametrize("method", SMALL)
def test_more_privacy_means_more_noise(members, method):
    _, loose, _ = fit(method, members, 10.0)
    _, tight, _ = fit(method, members, 1.0)
    assert tight.mechanisms[0].noise_multiplier > 2 * loose.mechanisms[0].noise_multiplier


def test_dp_kernel_makes_the_accounted_releases_with_the_accounted_noise(members, monkeypatch):
    made = []
    real_release = SubsampledReleases.release

    def spy(self, value):
        out = real_release(self, value)
        made.append((out - value, self.mechanism))
        return out

    monkeypatch.setattr(SubsampledReleases, "release", spy)
    _, ledger, config = fit("dp-kernel", members, 1.0)
    assert len(made) == config.steps
    assert all(m is ledger.mechanisms[0] for _, m in made)
    noise = torch.cat([n for n, _ in made])
    assert noise.std().item() == pytest.approx(ledger.mechanisms[0].noise_std, rel=0.02)


def test_subsampled_releases_sample_at_the_rate_and_refuse_misuse():
    ledger = PrivacyLedger(5.0, 1e-5)
    mechanism = ledger.calibrate("stat", "gaussian", sample_rate=0.2, steps=50)
    releases = SubsampledReleases(ledger, mechanism, 1000, torch.Generator().manual_seed(0))
    assert ledger.mechanisms == [mechanism]
    sizes = []
    for index in releases:
        sizes.append(len(index))
        releases.release(torch.zeros(3))
    releases.finish()
    assert 180 < np.mean(sizes) < 220 and len(set(sizes)) > 1  # Poisson: about q * n, varying
    with pytest.raises(RuntimeError, match="already made"):
        next(iter(releases))

    short = SubsampledReleases(PrivacyLedger(5.0, 1e-5), mechanism, 1000, torch.Generator().manual_seed(0))
    samples = iter(short)
    with pytest.raises(RuntimeError, match="needs a fresh sample"):
        short.release(torch.zeros(3))
    next(samples)
    with pytest.raises(RuntimeError, match="drawn but not released"):
        next(samples)
    short.release(torch.zeros(3))
    with pytest.raises(RuntimeError, match="1 releases made, 50 accounted"):
        short.finish()


@pytest.mark.parametrize("method", ["dp-kernel", "dp-ntk"])
def test_a_smoke_run_goes_end_to_end(method, tmp_path):
    sets = [f"params.{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in SMALL[method].items()]
    sets += ["eval.samples=60", "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1"]
    config = resolve(METHODS.get(method), "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(sets))
    row = run(config, Store(tmp_path), progress=False)
    assert 9.9 <= row["epsilon"] <= 10.0 * (1 + 1e-6)
    assert row["fid"] > 0 and 0 <= row["ca"] <= 1
