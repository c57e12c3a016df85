"""PrivImage, PDP-Diffusion and DPDM through the shared pipeline: what each pre-trains on, what each
spends, that pre-training is reused across epsilons, and that a fitted model restores exactly."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from privbench.config import PRESETS, parse_overrides, resolve
from privbench.context import RunContext, Task
from privbench.data import load, make_split
from privbench.diffusion import pipeline
from privbench.dp import PrivacyLedger
from privbench.methods import METHODS
from privbench.metrics import CostRecorder

# Real settings at a size that fits seconds on a 2-core CPU: 3 DP-SGD steps, 3 pre-training steps.
TINY = [
    "params.unet.base_channels=8", "params.dp.logical_batch=32", "params.dp.physical_batch=32",
    "params.dp.epochs=0.06", "params.sampler.steps=2", "params.sampler.batch_size=16",
]
PRETRAIN = ["params.pretrain.steps=3", "params.pretrain.batch_size=16"]
QUERY = ["params.query.epochs=1"]
TINY_SETTINGS = {"dpdm": TINY, "pdp-diffusion": TINY + PRETRAIN, "privimage": TINY + PRETRAIN + QUERY}


def method(name, epsilon=1.0, extra=()):
    cls = METHODS.get(name)
    config = resolve(cls, "mnist", epsilon, 0, "smoke", "cpu", parse_overrides([*TINY_SETTINGS[name], *extra]))
    return cls(config.params), config


@pytest.fixture(scope="module")
def task():
    train = load("mnist", "train")
    members = train.subset(make_split(train.labels, 0).members)
    return Task(members, load("glyphs", "train", size=62 * 20), train.classes)


@pytest.fixture
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def fit(name, task, cache, tmp_path, epsilon=1.0, extra=()):
    """Fit `name` at `epsilon` with a fresh ledger and cost recorder; the cache may be shared."""
    instance, config = method(name, epsilon, extra)
    ledger = PrivacyLedger(epsilon, config.delta)
    ctx = RunContext(tmp_path, cache, torch.device("cpu"), 0, progress=False, costs=CostRecorder())
    return instance.fit(task, ledger, ctx), ledger, ctx


@pytest.fixture
def pretraining_calls(monkeypatch):
    """Every call of the non-private trainer, with the labels it trained on."""
    calls = []
    real = pipeline.train_plain

    def spy(model, loss_fn, tensors, **kwargs):
        calls.append({"images": len(tensors[0]), "labels": tensors[1].clone()})
        return real(model, loss_fn, tensors, **kwargs)

    monkeypatch.setattr(pipeline, "train_plain", spy)
    return calls


def test_all_three_are_registered_with_presets_for_every_tier():
    for name in ("privimage", "pdp-diffusion", "dpdm"):
        for preset in PRESETS:
            resolve(METHODS.get(name), "mnist", 1.0, 0, preset, "cpu", {})
    paper = resolve(METHODS.get("privimage"), "cifar10", 10.0, 0, "paper", "cpu", {}).params
    assert (paper.dp.logical_batch, paper.dp.epochs, paper.dp.multiplicity, paper.dp.clip_norm) == (4096, 150, 32, 0.001)
    assert (paper.query.sigma, paper.query.classes_per_class, paper.sampler.steps) == (50, 5, 250)


def test_privimage_ledger_is_query_then_dp_sgd_composing_to_the_target(task, cache, tmp_path, pretraining_calls):
    _, ledger, _ = fit("privimage", task, cache, tmp_path)
    query, dp_sgd = ledger.mechanisms
    assert (query.name, query.kind, dp_sgd.name, dp_sgd.kind) == ("semantic-query", "gaussian", "dp-sgd", "dp-sgd")
    assert 0.99 <= ledger.spent() <= 1.0 + 1e-6
    # The query's share of the budget forces more DP-SGD noise than DPDM gets at the same settings.
    _, dpdm_ledger, _ = fit("dpdm", task, cache, tmp_path)
    (dpdm_sgd,) = dpdm_ledger.mechanisms
    assert (dpdm_sgd.sample_rate, dpdm_sgd.steps) == (dp_sgd.sample_rate, dp_sgd.steps)
    assert dp_sgd.noise_multiplier > dpdm_sgd.noise_multiplier


def test_pretraining_is_reused_across_epsilons(task, cache, tmp_path, pretraining_calls):
    _, _, first = fit("privimage", task, cache, tmp_path, epsilon=1.0)
    assert len(pretraining_calls) == 1
    _, ledger, second = fit("privimage", task, cache, tmp_path, epsilon=10.0)
    assert len(pretraining_calls) == 1  # the second epsilon did no pre-training work
    assert ledger.spent() == pytest.approx(10.0, rel=0.01)
    before = {r["name"]: r for r in first.costs.records()}
    after = {r["name"]: r for r in second.costs.records()}
    for stage in ("query-classifier", "pretrain"):
        assert not before[stage]["reused"] and after[stage]["reused"]
        assert after[stage]["wall_s"] == before[stage]["wall_s"]  # the original cost, not zero
    assert not after["dp-train"]["reused"] and not after["semantic-query"]["reused"]


def test_a_different_selection_pretrains_again(task, cache, tmp_path, pretraining_calls):
    fit("privimage", task, cache, tmp_path)
    fit("privimage", task, cache, tmp_path, extra=["params.query.classes_per_class=1"])
    assert len(pretraining_calls) == 2


def test_privimage_pretrains_on_its_selection_under_the_sensitive_labels(task, cache, tmp_path, pretraining_calls):
    fit("privimage", task, cache, tmp_path)
    selection = (tmp_path / "selection.json").read_text()
    chosen = json.loads(selection)
    assert list(chosen) == list(task.classes) and all(len(v) == 2 for v in chosen.values())
    picked = [task.public.classes.index(c) for v in chosen.values() for c in v]
    assert len(set(picked)) == 20  # disjoint
    (call,) = pretraining_calls
    assert call["images"] == np.isin(task.public.labels, picked).sum()
    for sensitive, names in enumerate(chosen.values()):
        wanted = np.isin(task.public.labels, [task.public.classes.index(c) for c in names]).sum()
        assert (call["labels"] == sensitive).sum().item() == wanted


def test_pdp_diffusion_pretrains_unconditionally_on_all_public_images(task, cache, tmp_path, pretraining_calls):
    synthesizer, ledger, _ = fit("pdp-diffusion", task, cache, tmp_path)
    (call,) = pretraining_calls
    assert call["images"] == len(task.public)
    assert (call["labels"] == synthesizer.net.unconditional_label).all()
    assert [m.name for m in ledger.mechanisms] == ["dp-sgd"]


def test_dpdm_uses_no_public_data_and_noise_multiplicity(task, cache, tmp_path, pretraining_calls):
    instance, _ = method("dpdm")
    assert not type(instance).uses_public and instance.config.dp.multiplicity == 2
    synthesizer, ledger, ctx = fit("dpdm", dataclasses.replace(task, public=None), cache, tmp_path)
    assert pretraining_calls == []
    assert [r["name"] for r in ctx.costs.records()] == ["dp-train"]
    assert synthesizer.parameters == sum(p.numel() for p in synthesizer.net.parameters())


def test_class_counts_release_is_accounted_and_sets_the_class_mix(task, cache, tmp_path):
    synthesizer, ledger, _ = fit("dpdm", task, cache, tmp_path, extra=["params.class_counts_sigma=20.0"])
    counts, _ = ledger.mechanisms
    assert (counts.name, counts.sensitivity, counts.noise_multiplier) == ("class-counts", 1.0, 20.0)
    true = np.bincount(task.members.labels, minlength=10) / len(task.members)
    np.testing.assert_allclose(synthesizer.proportions.numpy(), true, atol=0.04)  # noise std 20 against ~180 members per class
    assert ledger.spent() <= 1.0 + 1e-6


def test_uniform_class_mix_spends_nothing(task, cache, tmp_path):
    synthesizer, ledger, _ = fit("dpdm", task, cache, tmp_path)
    assert torch.equal(synthesizer.proportions, torch.full((10,), 0.1))
    assert [m.name for m in ledger.mechanisms] == ["dp-sgd"]


def test_samples_and_restore(task, cache, tmp_path):
    synthesizer, _, ctx = fit("dpdm", task, cache, tmp_path)
    samples = synthesizer.sample(20, generator=torch.Generator().manual_seed(3))
    assert samples.images.shape == (20, 28, 28, 1) and samples.images.dtype == np.uint8
    assert samples.classes == task.classes and set(samples.labels) <= set(range(10))
    instance, _ = method("dpdm")
    restored = instance.restore(synthesizer.state_dict(), task, ctx)
    again = restored.sample(20, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(again.images, samples.images)
    np.testing.assert_array_equal(again.labels, samples.labels)


def test_per_example_loss_for_white_box_attacks(task, cache, tmp_path):
    synthesizer, _, _ = fit("dpdm", task, cache, tmp_path)
    images = task.members.subset(np.arange(6))
    sigma, noise = torch.full((6,), 0.5), torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    losses = synthesizer.loss(images, sigma, noise)
    assert losses.shape == (6,) and np.isfinite(losses).all() and (losses >= 0).all()
    np.testing.assert_array_equal(losses, synthesizer.loss(images, sigma, noise))  # deterministic given noise
    assert not math.isclose(losses[0], synthesizer.loss(images, sigma * 4, noise)[0])


def test_a_privimage_run_through_the_harness_records_every_stage(tmp_path):
    from privbench.harness import run
    from privbench.store import Store

    eval_tiny = ["eval.samples=40", "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1",
                 "data.public_size=1240", "audit.members=40", "audit.resamples=100"]
    config = resolve(METHODS.get("privimage"), "mnist", 1.0, 0, "smoke", "cpu",
                     parse_overrides([*TINY_SETTINGS["privimage"], *eval_tiny]))
    store = Store(tmp_path)
    row = run(config, store, progress=False)
    assert 0.99 <= row["epsilon"] <= 1.0 + 1e-6
    run_dir = store.run_dir(row["run_id"])
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [m["name"] for m in ledger["mechanisms"]] == ["semantic-query", "dp-sgd"]
    assert (run_dir / "selection.json").exists()
    costs = store.costs()
    assert list(costs["stage"]) == [
        "query-classifier", "semantic-query", "pretrain", "dp-train", "sample", "fid", "ca", "audit",
    ]
    assert (costs["wall_s"] > 0).all() and not costs["reused"].any()
    audit = json.loads((run_dir / "audit.json").read_text())
    assert set(audit) == {"loss", "pia", "secmi", "nearest"}  # every attack applies to a diffusion model
    runs = store.runs()
    assert 0 <= runs.loc[0, "mia_tpr@0.1"] <= 1 and runs.loc[0, "eps_lb"] >= 0


def test_eps_inf_trains_without_noise_for_a_no_privacy_baseline(task, cache, tmp_path):
    _, ledger, _ = fit("dpdm", task, cache, tmp_path, epsilon=math.inf)
    (dp_sgd,) = ledger.mechanisms
    assert dp_sgd.noise_multiplier == 0 and math.isinf(ledger.spent())


def test_the_pretraining_cache_key_is_the_same_in_every_process():
    # String hashing is randomised per process, so anything built from a set differs between runs.
    import subprocess
    import sys

    code = ("import json; from privbench.diffusion.pipeline import architecture; from privbench.nets.unet import build_unet; "
            "print(json.dumps(architecture(build_unet(28, 1, 10, 16, (1, 2, 2), 1, (7,))), default=str))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(keys) == 1, keys
