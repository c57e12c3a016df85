"""The GANs (DP-GAN, GS-WGAN): a member's influence is confined to what the ledger bounds, the
mechanisms recorded are the ones the training loops run, the selected-Gaussian accounting, and both
methods end to end."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privbench.config import build, parse_overrides, resolve
from privbench.context import RunContext, Task
from privbench.data import load, make_split
from privbench.data.transforms import to_model
from privbench.dp import DPSGDPhase, Mechanism, PrivacyLedger, SelectedReleases, compose, per_sample_gradients
from privbench.dp import sgd
from privbench.harness import run
from privbench.methods import METHODS, dp_gan, gs_wgan, presets
from privbench.nets.discriminators import ConvDiscriminator
from privbench.nets.generators import ConvGenerator
from privbench.store import Store

CPU = torch.device("cpu")
# Small settings per method: a fit in seconds on 2 CPU cores.
SMALL = {
    "dp-gan": {"epochs": 2, "logical_batch": 60, "physical_batch": 64, "batch_size": 32, "d_updates": 2},
    "gs-wgan": {"discriminators": 5, "iterations": 20, "batch_size": 4, "d_batch": 8, "critic_iters": 1,
                "warmup_iters": 1},
}


@pytest.fixture(scope="module")
def members():
    train = load("mnist", "train")
    return train.subset(make_split(train.labels, 0).members[:300])


def ctx(seed=0):
    return RunContext(Path("."), Path("."), CPU, seed, progress=False)


def fit(method, members, epsilon):
    Method = METHODS.get(method)
    config = build(Method.Config, {**presets(Method)["smoke"], **SMALL[method]})
    ledger = PrivacyLedger(epsilon, 1e-5)
    return Method(config).fit(Task(members, None, members.classes), ledger, ctx()), ledger, config


def test_no_generated_image_or_score_depends_on_the_rest_of_its_batch():
    torch.manual_seed(0)
    z, labels, x = torch.randn(6, 8), torch.arange(6), torch.rand(6, 1, 28, 28)
    layer = ConvGenerator(8, 10, 28, 1, 32, (8, 4), 5, norm="layer").train()
    d = ConvDiscriminator(28, 1, 10, (8, 16))
    alone = torch.cat([layer(z[i : i + 1], labels[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(layer(z, labels), alone)
    torch.testing.assert_close(d(x, labels), torch.cat([d(x[i : i + 1], labels[i : i + 1]) for i in range(6)]))
    # The check has teeth: BatchNorm couples a batch's images.
    batch = ConvGenerator(8, 10, 28, 1, 32, (8, 4), 5, norm="batch").train()
    assert not torch.allclose(batch(z, labels)[:2], batch(z[:2], labels[:2]))


@pytest.mark.parametrize("mode", dp_gan.GAN_GRAD_SAMPLE_MODES)
def test_a_dp_gan_member_changes_only_its_own_per_example_gradient(members, mode):
    # Member 3's image is replaced; every other row's gradient (its real term and its generated
    # partner's) stays as it was, so the clipped sum moves by one clipped row at most.
    torch.manual_seed(0)
    generator = ConvGenerator(8, 10, 28, 1, 32, (8, 4), 5, norm="layer")
    d = ConvDiscriminator(28, 1, 10, (8, 16))
    with torch.no_grad():  # scores near 0: both hinge terms of every row are active
        d.embedding.weight.mul_(0.01)
    x, y = to_model(members.images[:6]), torch.from_numpy(members.labels[:6])
    changed = x.clone()
    changed[3] = to_model(members.images[10:11])[0]

    def grads(images):
        loss = dp_gan.discriminator_loss(generator, torch.Generator().manual_seed(1))
        per_example = per_sample_gradients(d, loss, (images, y), mode)
        return torch.cat([g.flatten(1) for g in per_example.values()], dim=1)

    before, after = grads(x), grads(changed)
    others = [i for i in range(6) if i != 3]
    torch.testing.assert_close(before[others], after[others])
    assert (before[3] - after[3]).norm() > 1e-3 * before[3].norm()


@pytest.mark.parametrize("mode", dp_gan.GAN_GRAD_SAMPLE_MODES)
def test_frozen_keeps_post_processing_out_of_the_private_gradient(members, mode):
    torch.manual_seed(0)
    generator = ConvGenerator(8, 10, 28, 1, 32, (8, 4), 5, norm="layer")
    d = ConvDiscriminator(28, 1, 10, (8, 16))
    draws = torch.Generator().manual_seed(0)
    data = (to_model(members.images[:40]), torch.from_numpy(members.labels[:40]))
    g_optimizer = torch.optim.Adam(generator.parameters())
    with DPSGDPhase(d, data, PrivacyLedger(5.0, 1e-5), ctx(), logical_batch=20, physical_batch=8, steps=3, lr=1e-3,
                    grad_sample_mode=mode, ema_decay=0.0) as phase:
        for batch in phase.logical_batches():
            phase.step(dp_gan.discriminator_loss(generator, draws), batch)
            before = [(p.detach().clone(), p.grad.clone()) for p in d.parameters()]
            with phase.frozen() as frozen:
                dp_gan.generator_step(generator, frozen, g_optimizer, 16, draws)
            # D's parameters and the gradients its optimizer holds are untouched, and it trains on.
            assert all(torch.equal(w, p) and torch.equal(g, p.grad) for (w, g), p in zip(before, d.parameters()))
            assert all(p.requires_grad for p in d.parameters())
    assert phase.taken == 3 and all(p.grad is not None for p in generator.parameters())


def test_dp_gan_records_one_dp_sgd_mechanism_and_steps_the_generator_as_configured(members, monkeypatch):
    phases, generator_steps = [], []
    real_step, real_generator_step = sgd.DPSGDPhase.step, dp_gan.generator_step
    monkeypatch.setattr(sgd.DPSGDPhase, "step", lambda phase, *a: phases.append(phase) or real_step(phase, *a))
    monkeypatch.setattr(dp_gan, "generator_step", lambda *a: generator_steps.append(1) or real_generator_step(*a))
    _, ledger, config = fit("dp-gan", members, 2.0)
    (mechanism,) = ledger.mechanisms
    q = config.logical_batch / len(members)
    assert (mechanism.kind, mechanism.sample_rate, mechanism.steps) == ("dp-sgd", q, round(config.epochs / q))
    assert mechanism.sensitivity == config.clip_norm
    phase = phases[0]
    assert phase.mechanism is mechanism and phase.taken == mechanism.steps == len(phases)
    assert phase.optimizer.noise_multiplier == mechanism.noise_multiplier > 0
    assert len(generator_steps) == mechanism.steps // config.d_updates
    assert 2.0 * 0.99 <= ledger.spent() <= 2.0 * (1 + 1e-6)


def test_selected_gaussian_accounting():
    one = Mechanism("a", "selected-gaussian", 2.0, 1.0, 1)
    assert compose([one], 1e-5, "rdp") == compose([Mechanism("b", "gaussian", 2.0)], 1e-5, "rdp")
    # Without the Poisson amplification a selected part costs more than a subsampled batch, and less
    # than running every step on everyone.
    selected = Mechanism("c", "selected-gaussian", 2.0, 0.02, 500)
    poisson = Mechanism("d", "dp-sgd", 2.0, 0.02, 500)
    everyone = Mechanism("e", "dp-sgd", 2.0, 1.0, 500)
    eps = {m.name: compose([m], 1e-5, "rdp")[0] for m in (selected, poisson, everyone)}
    assert eps["d"] < eps["c"] < eps["e"]
    assert compose([selected, poisson], 1e-5, "prv")[1] == "rdp"  # PRV has no selected-Gaussian: RDP composes
    calibrated = PrivacyLedger(10.0, 1e-5).calibrate("f", "selected-gaussian", sample_rate=0.02, steps=500)
    assert 10.0 * 0.99 <= compose([calibrated], 1e-5, "rdp")[0] <= 10.0


def test_selected_releases_draw_parts_and_refuse_misuse():
    ledger = PrivacyLedger(5.0, 1e-5)
    mechanism = ledger.calibrate("m", "selected-gaussian", sample_rate=1 / 4, steps=400)
    releases = SelectedReleases(ledger, mechanism, 4, torch.Generator().manual_seed(0))
    assert ledger.mechanisms == [mechanism]
    parts = []
    for part in releases:
        parts.append(part)
        releases.release(torch.zeros(2))
    releases.finish()
    assert set(parts) == {0, 1, 2, 3} and np.bincount(parts).min() > 60
    with pytest.raises(ValueError, match="sample rate 1/3"):
        SelectedReleases(PrivacyLedger(5.0, 1e-5), mechanism, 3, torch.Generator())
    short = SelectedReleases(PrivacyLedger(5.0, 1e-5), mechanism, 4, torch.Generator())
    draws = iter(short)
    next(draws)
    with pytest.raises(RuntimeError, match="drawn but not released"):
        next(draws)
    short.release(torch.zeros(2))
    with pytest.raises(RuntimeError, match="1 releases made, 400 accounted"):
        short.finish()


def test_gs_wgan_releases_clipped_gradients_with_the_noise_accounted(members, monkeypatch):
    released = []
    real_release = SelectedReleases.release

    def spy(self, value):
        noisy = real_release(self, value)
        released.append((value, noisy))
        return noisy

    monkeypatch.setattr(SelectedReleases, "release", spy)
    _, ledger, config = fit("gs-wgan", members, 2.0)
    (mechanism,) = ledger.mechanisms
    assert (mechanism.kind, mechanism.sample_rate, mechanism.steps) == (
        "selected-gaussian", 1 / config.discriminators, config.iterations)
    assert mechanism.sensitivity == pytest.approx(2 * config.clip_norm * math.sqrt(config.batch_size))
    assert len(released) == config.iterations
    values = torch.stack([v for v, _ in released])
    assert values.shape[1] == config.batch_size and values.flatten(2).norm(dim=2).max() <= config.clip_norm * (1 + 1e-5)
    noise = torch.stack([n - v for v, n in released])
    # 20 x 4 x 784 draws: their standard deviation is within 2 % of the accounted one.
    assert noise.std().item() == pytest.approx(mechanism.noise_std, rel=0.02)
    assert 2.0 * 0.99 <= ledger.spent() <= 2.0 * (1 + 1e-6)


@pytest.mark.parametrize("method", SMALL)
def test_samples_honour_labels_and_survive_a_restore(members, method):
    synthesizer, _, config = fit(method, members, math.inf)
    assert synthesizer.capabilities == frozenset()  # no white-box attack reads a GAN's generator
    labels = np.repeat(np.arange(10), 3)
    assert synthesizer.sample(30, labels=labels).labels.tolist() == labels.tolist()
    restored = METHODS.get(method)(config).restore(synthesizer.state_dict(), Task(members, None, members.classes), ctx())
    first = synthesizer.sample(64, generator=torch.Generator().manual_seed(5))
    assert first.images.shape == (64, 28, 28, 1) and first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.images, restored.sample(64, generator=torch.Generator().manual_seed(5)).images)


@pytest.mark.parametrize("method", SMALL)
def test_a_smoke_run_goes_end_to_end(method, tmp_path):
    sets = [f"params.{k}={v}" for k, v in SMALL[method].items()]
    sets += ["eval.samples=60", "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1"]
    config = resolve(METHODS.get(method), "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(sets))
    row = run(config, Store(tmp_path), progress=False)
    assert 9.9 <= row["epsilon"] <= 10.0 * (1 + 1e-6)
    assert row["fid"] > 0 and 0 <= row["ca"] <= 1
