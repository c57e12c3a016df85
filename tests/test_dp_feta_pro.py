"""DP-FETA-Pro: the frequency release moves by exactly its sensitivity between neighbouring member sets
and adds the noise the ledger accounts, at the configured noise multiplier; the central images, the
frequency release and DP-SGD compose to the target; pre-training runs the central images, then the
frequency-stage images, and the second stage's cache names the weights the first left; bad settings
are refused in one line; a smoke run goes through the harness."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privbench.config import parse_overrides, resolve
from privbench.context import RunContext, Task
from privbench.data import load, make_split
from privbench.data.base import ImageSet
from privbench.diffusion import pipeline
from privbench.diffusion.pipeline import PretrainConfig, UNetConfig, build_model, weights_digest
from privbench.dp import PrivacyLedger, compose
from privbench.errors import PrivbenchError
from privbench.harness import run
from privbench.methods import METHODS, mean_embedding
from privbench.methods.dp_feta_pro import FrequencyConfig, frequency_images, pooled
from privbench.methods.dp_merf import RandomFourierFeatures, draw_frequencies
from privbench.metrics import CostRecorder
from privbench.store import Store

CPU = torch.device("cpu")
# Real settings at a size that fits seconds on a 2-core CPU: 3 DP-SGD steps, 3 + 3 pre-training steps,
# one generator epoch on 200 random features, 40 frequency-stage images.
TINY = [
    "params.unet.base_channels=8", "params.dp.logical_batch=32", "params.dp.physical_batch=32",
    "params.dp.epochs=0.06", "params.sampler.steps=2", "params.sampler.batch_size=16",
    "params.pretrain.steps=3", "params.pretrain.batch_size=16", "params.central.augment_copies=2",
    "params.frequency.d_rff=200", "params.frequency.epochs=1", "params.frequency.samples=40",
    "params.frequency_pretrain.steps=3", "params.frequency_pretrain.batch_size=16",
]


@pytest.fixture(scope="module")
def members():
    train = load("mnist", "train")
    return train.subset(make_split(train.labels, 0).members)


def ctx_at(tmp_path: Path) -> RunContext:
    return RunContext(tmp_path, tmp_path / "cache", CPU, 0, progress=False, costs=CostRecorder())


def resolved(epsilon: float, extra=()):
    return resolve(METHODS.get("dp-feta-pro"), "mnist", epsilon, 0, "smoke", "cpu", parse_overrides([*TINY, *extra]))


def frequency_config(**changes) -> FrequencyConfig:
    values = dict(sigma=3.0, downsample=1, d_rff=200, rff_sigma=105.0, z_dim=5, hidden=32, channels=(16, 8),
                  kernel_size=5, epochs=1, batch_size=100, lr=0.01, lr_decay=0.9, sample_batch_size=100, samples=20)
    return FrequencyConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def fitted(members, tmp_path_factory):
    """One fit at eps 1, watching the embedding release and every pre-training call."""
    tmp_path = tmp_path_factory.mktemp("fit")
    releases, calls = [], []
    real_release, real_train = mean_embedding.release_gaussian, pipeline.train_plain

    def release_spy(ledger, mechanism, value, generator):
        out = real_release(ledger, mechanism, value, generator)
        releases.append((value, out, mechanism))
        return out

    def train_spy(model, loss_fn, tensors, **kwargs):
        calls.append({"images": tensors[0].clone(), "labels": tensors[1].clone(), "start": weights_digest(model)})
        return real_train(model, loss_fn, tensors, **kwargs)

    config = resolved(1.0)
    ledger = PrivacyLedger(1.0, config.delta)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mean_embedding, "release_gaussian", release_spy)
        patch.setattr(pipeline, "train_plain", train_spy)
        METHODS.get("dp-feta-pro")(config.params).fit(Task(members, None, members.classes), ledger, ctx_at(tmp_path))
    return {"ledger": ledger, "config": config, "releases": releases, "calls": calls, "dir": tmp_path}


@pytest.mark.parametrize("downsample", [1, 2])
def test_removing_one_member_moves_the_frequency_release_by_exactly_the_sensitivity(members, downsample):
    base = members.subset(np.arange(200))
    small = pooled(base, downsample)
    side = 28 // downsample
    assert small.images.shape == (200, side, side, 1)
    phi = RandomFourierFeatures(draw_frequencies(400, 105.0, side * side, torch.Generator().manual_seed(0)))
    full = mean_embedding.embedding_sum(small, phi, 10, CPU)
    for i in (0, 17, 199):
        keep = np.delete(np.arange(200), i)
        # Each member is pooled alone: pooling the neighbour is the neighbour of the pooled set.
        assert (pooled(base.subset(keep), downsample).images == small.images[keep]).all()
        change = full - mean_embedding.embedding_sum(small.subset(keep), phi, 10, CPU)
        assert change.norm().item() == pytest.approx(mean_embedding.SENSITIVITY, rel=1e-4)


def test_pooling_averages_each_block():
    image = np.zeros((1, 4, 4, 1), np.uint8)
    image[0, :2, :2, 0] = [[0, 100], [200, 100]]
    out = pooled(ImageSet(image, np.zeros(1, np.int64), ("a",), "x"), 2).images
    assert out[..., 0].tolist() == [[[100, 0], [0, 0]]]


def test_a_fixed_noise_release_adds_the_accounted_noise(members, tmp_path, monkeypatch):
    made = []
    real = mean_embedding.release_gaussian

    def spy(ledger, mechanism, value, generator):
        out = real(ledger, mechanism, value, generator)
        made.append((value, out, mechanism))
        return out

    monkeypatch.setattr(mean_embedding, "release_gaussian", spy)
    phi = RandomFourierFeatures(draw_frequencies(1000, 105.0, 784, torch.Generator().manual_seed(1)))
    ledger = PrivacyLedger(10.0, 1e-5)
    mean_embedding.release_embedding("mean-embedding", members, phi, 10, ledger, ctx_at(tmp_path), noise_multiplier=3.0)
    (value, out, mechanism), = made
    assert ledger.mechanisms == [mechanism]
    assert (mechanism.noise_multiplier, mechanism.sensitivity, mechanism.sample_rate, mechanism.steps) == (3.0, math.sqrt(2), 1.0, 1)
    noise = out - value  # 10,010 draws: the std of their std is 0.7 %
    assert noise.std().item() == pytest.approx(3.0 * math.sqrt(2), rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * mechanism.noise_std


def test_the_ledger_is_the_two_releases_then_dp_sgd_composing_to_the_target(fitted, members):
    ledger, c = fitted["ledger"], fitted["config"].params
    central, frequency, dp_sgd = ledger.mechanisms
    assert (central.name, central.noise_multiplier, central.steps) == ("central-images", c.central.sigma, c.central.releases)
    assert central.sample_rate == c.central.batch_size / len(members)
    assert (frequency.name, frequency.kind, frequency.noise_multiplier) == ("mean-embedding", "gaussian", c.frequency.sigma)
    assert (frequency.sensitivity, frequency.sample_rate, frequency.steps) == (mean_embedding.SENSITIVITY, 1.0, 1)
    assert dp_sgd.name == "dp-sgd" and 0.99 <= ledger.spent() <= 1.0 + 1e-6
    # DP-SGD was calibrated with the frequency release in the ledger: without it, the composition falls
    # short of the target by more than calibration's tolerance (0.5 %; here by 3 %).
    assert compose([central, dp_sgd], ledger.delta)[0] < 0.98 * ledger.spent()
    # The release made is the release accounted: the very mechanism, its noise at its std (2,010 draws).
    (value, out, mechanism), = fitted["releases"]
    assert mechanism is frequency and value.numel() == 200 * 10 + 10
    assert (out - value).std().item() == pytest.approx(frequency.noise_std, rel=0.1)


def test_pretraining_runs_the_central_images_then_the_frequency_images_from_where_the_first_left(fitted):
    spatial, frequency = fitted["calls"]
    released = np.load(fitted["dir"] / "central_images.npz")
    assert len(spatial["images"]) == 2 * len(released["images"]) == 20
    assert spatial["labels"].tolist() == np.tile(released["labels"], 2).tolist()
    assert len(frequency["images"]) == 40 and frequency["labels"].tolist() == (np.arange(40) % 10).tolist()
    assert frequency["start"] != spatial["start"]  # the second stage starts from the first's weights


def test_frequency_images_are_generated_at_the_pooled_side_and_upsampled(members, tmp_path):
    ledger = PrivacyLedger(10.0, 1e-5)
    config = frequency_config(downsample=2, channels=(8,))
    images = frequency_images(Task(members.subset(np.arange(300)), None, members.classes), ledger, config, ctx_at(tmp_path))
    assert images.images.shape == (20, 28, 28, 1) and images.labels.tolist() == (np.arange(20) % 10).tolist()
    blocks = images.images[..., 0].reshape(20, 14, 2, 14, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # nearest upsampling of a 14 px image
    (mechanism,) = ledger.mechanisms
    assert mechanism.noise_multiplier == 3.0 and mechanism.name == "mean-embedding"


def test_a_continued_stage_s_cache_names_the_weights_it_starts_from(members, tmp_path):
    task = Task(members, None, members.classes)
    images = members.subset(np.arange(16))
    config = PretrainConfig(steps=1, batch_size=8, lr=1e-3, ema_decay=0.9, label_dropout=0.0)
    unet = UNetConfig(base_channels=8, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=())

    def stage(change: float, continued: bool, name: str) -> bool:
        """Pre-train a fresh model, its first weights moved by `change`; whether the cache served it."""
        ctx = ctx_at(tmp_path)
        model = build_model(unet, task, ctx)
        with torch.no_grad():
            next(model.parameters()).add_(change)
        pipeline.pretrain(model, images, True, config, ctx, stage=name, continued=continued)
        (record,) = ctx.costs.records()
        assert record["name"] == name
        return record["reused"]

    assert not stage(0.0, True, "pretrain-frequency")
    assert stage(0.0, True, "pretrain-frequency")  # the same start: the same result
    assert not stage(0.5, True, "pretrain-frequency")  # another start: never the other's result
    assert not stage(0.0, False, "pretrain")
    assert stage(0.5, False, "pretrain")  # a first stage's key names the settings and seed alone


def test_eps_inf_keeps_both_releases_and_trains_without_dp_sgd_noise(members, tmp_path):
    config = resolved(math.inf)
    ledger = PrivacyLedger(math.inf, config.delta)
    METHODS.get("dp-feta-pro")(config.params).fit(Task(members, None, members.classes), ledger, ctx_at(tmp_path))
    central, frequency, dp_sgd = ledger.mechanisms
    assert (central.noise_multiplier, frequency.noise_multiplier, dp_sgd.noise_multiplier) == (10.0, 10.0, 0)
    assert math.isinf(ledger.spent())


@pytest.mark.parametrize(
    "sets, complaint",
    [
        (["params.frequency.downsample=5"], "setting 'params.frequency.downsample' = 5 does not divide the 28 px side: "
                                            "use a divisor of it, e.g. --set params.frequency.downsample=4"),
        (["params.frequency.downsample=4"], "setting 'params.frequency.channels' gives the generator 2 upsampling blocks, "
                                            "which need a resolution divisible by 4, got 7 px"),
        (["params.frequency.sigma=0"], "setting 'params.frequency.sigma' must be"),
        (["params.frequency.samples=0"], "setting 'params.frequency.samples' must be a positive integer"),
        (["params.frequency.d_rff=201"], "setting 'params.frequency.d_rff' must be an even positive integer"),
        (["params.frequency_pretrain.batch_size=0"], "setting 'params.frequency_pretrain.batch_size' must be a positive integer"),
        (["params.frequency.mmd_type=sphere"], "unknown setting 'params.frequency.mmd_type'"),
    ],
)
def test_bad_settings_are_refused_in_one_line_at_validation(sets, complaint):
    with pytest.raises(PrivbenchError) as refused:
        resolved(1.0, sets)
    assert complaint in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_a_smoke_run_through_the_harness_records_every_stage(tmp_path):
    eval_tiny = ["eval.samples=40", "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1",
                 "audit.members=40", "audit.resamples=100"]
    store = Store(tmp_path)
    row = run(resolved(1.0, eval_tiny), store, progress=False)
    assert 0.99 <= row["epsilon"] <= 1.0 + 1e-6
    ledger = json.loads((store.run_dir(row["run_id"]) / "ledger.json").read_text())
    assert [m["name"] for m in ledger["mechanisms"]] == ["central-images", "mean-embedding", "dp-sgd"]
    costs = store.costs()
    assert list(costs["stage"]) == ["central-images", "frequency-generator", "pretrain", "pretrain-frequency", "dp-train",
                                    "sample", "fid", "ca", "audit"]
    assert (costs["wall_s"] > 0).all() and not costs["reused"].any()
