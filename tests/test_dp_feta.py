"""DP-FETA: the central-image release moves by at most its sensitivity between neighbouring member
sets, adds the noise the ledger accounts, composes with DP-SGD to the target; pre-training sees only
the released images; bad settings are refused in one line; a smoke run goes through the harness."""

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
from privbench.dp import PrivacyLedger, SubsampledReleases
from privbench.errors import PrivbenchError
from privbench.harness import run
from privbench.methods import METHODS
from privbench.methods.dp_feta import CentralConfig, class_sums, post_process, release_central_means, sensitivity
from privbench.metrics import CostRecorder
from privbench.store import Store

CPU = torch.device("cpu")
# Real settings at a size that fits seconds on a 2-core CPU: 3 DP-SGD steps, 3 pre-training steps.
TINY = [
    "params.unet.base_channels=8", "params.dp.logical_batch=32", "params.dp.physical_batch=32",
    "params.dp.epochs=0.06", "params.sampler.steps=2", "params.sampler.batch_size=16",
    "params.pretrain.steps=3", "params.pretrain.batch_size=16", "params.central.augment_copies=2",
]


@pytest.fixture(scope="module")
def members():
    train = load("mnist", "train")
    return train.subset(make_split(train.labels, 0).members)


def ctx_at(tmp_path: Path) -> RunContext:
    return RunContext(tmp_path, tmp_path / "cache", CPU, 0, progress=False, costs=CostRecorder())


def resolved(epsilon: float, extra=()):
    return resolve(METHODS.get("dp-feta"), "mnist", epsilon, 0, "smoke", "cpu", parse_overrides([*TINY, *extra]))


def fit(members, tmp_path, epsilon=1.0, extra=()):
    config = resolved(epsilon, extra)
    ledger = PrivacyLedger(epsilon, config.delta)
    synthesizer = METHODS.get("dp-feta")(config.params).fit(Task(members, None, members.classes), ledger, ctx_at(tmp_path))
    return synthesizer, ledger, config


@pytest.fixture
def pretraining_calls(monkeypatch):
    calls = []
    real = pipeline.train_plain

    def spy(model, loss_fn, tensors, **kwargs):
        calls.append({"images": tensors[0].clone(), "labels": tensors[1].clone()})
        return real(model, loss_fn, tensors, **kwargs)

    monkeypatch.setattr(pipeline, "train_plain", spy)
    return calls


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_one_member_moves_the_class_sums_by_at_most_the_sensitivity(members, downsample):
    bound = sensitivity(1, 28, downsample)
    assert bound == 28 / downsample
    base = members.subset(np.arange(200))
    full = class_sums(base, 10, downsample)
    for i in range(0, 200, 13):  # remove one member: only its class row moves
        without = class_sums(base.subset(np.delete(np.arange(200), i)), 10, downsample)
        moved = full - without
        assert (moved.flatten(1).norm(dim=1) > 0).sum() <= 1
        assert moved.norm().item() <= bound * (1 + 1e-12)
    white = base.subset(np.arange(1))  # the worst member, every pixel 255, attains the bound
    white.images[:] = 255
    assert class_sums(white, 10, downsample).norm().item() == pytest.approx(bound, rel=1e-12)
    colour = ImageSet(np.full((1, 32, 32, 3), 255, np.uint8), np.zeros(1, np.int64), ("a", "b"), "white")
    assert class_sums(colour, 2, downsample).norm().item() == pytest.approx(sensitivity(3, 32, downsample), rel=1e-12)
    assert sensitivity(3, 32, downsample) == pytest.approx(math.sqrt(3) * 32 / downsample)


def test_the_release_adds_the_accounted_noise_to_the_sums_and_divides_by_the_public_count(members, tmp_path, monkeypatch):
    made = []
    real_release = SubsampledReleases.release

    def spy(self, value):
        out = real_release(self, value)
        made.append((value, out, self.mechanism))
        return out

    monkeypatch.setattr(SubsampledReleases, "release", spy)
    config = CentralConfig(batch_size=900, sigma=5.0, releases=4, downsample=2, augment_copies=1)
    ledger = PrivacyLedger(10.0, 1e-5)
    means = release_central_means(Task(members, None, members.classes), ledger, config, ctx_at(tmp_path))
    (mechanism,) = ledger.mechanisms
    assert (mechanism.name, mechanism.kind, mechanism.noise_multiplier, mechanism.steps) == ("central-images", "gaussian", 5.0, 4)
    assert mechanism.sample_rate == 900 / len(members) and mechanism.sensitivity == 14.0
    assert len(made) == 4 and all(m is mechanism for *_, m in made)
    noise = torch.cat([(out - value).flatten() for value, out, _ in made])  # 4 x 10 x 196 draws
    assert noise.std().item() == pytest.approx(mechanism.noise_std, rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * mechanism.noise_std
    assert means.shape == (40, 1, 14, 14)
    torch.testing.assert_close(means, torch.cat([out for _, out, _ in made]) / 90.0)  # m = 900 / 10 classes
    sizes = [value.sum().item() for value, _, _ in made]  # each sample's members: about q * n of them
    assert len(set(sizes)) == 4


def test_with_little_noise_the_central_images_are_the_class_means(members, tmp_path):
    config = CentralConfig(batch_size=len(members) - 1, sigma=0.01, releases=1, downsample=1, augment_copies=1)
    means = release_central_means(Task(members, None, members.classes), PrivacyLedger(math.inf, 1e-5), config, ctx_at(tmp_path))
    x = torch.from_numpy(members.images).permute(0, 3, 1, 2).double() / 255
    truth = torch.stack([x[members.labels == c].mean(0) for c in range(10)])
    # The public count m stands for the class count (~180 here): the means agree up to their ratio.
    for c in range(10):
        ratio = (means[c].sum() / truth[c].sum()).item()
        share = (members.labels == c).sum() / (len(members) / 10)
        assert ratio == pytest.approx(share, rel=0.02)
        assert torch.corrcoef(torch.stack([means[c].flatten(), truth[c].flatten()]))[0, 1] > 0.99


def test_post_processing_keeps_a_flat_image_flat_and_returns_uint8_at_the_run_side():
    images = post_process(torch.full((3, 1, 14, 14), 0.5, dtype=torch.float64), 28)
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8 and (images == 128).all()
    clipped = post_process(torch.full((1, 3, 8, 8), 7.0, dtype=torch.float64), 32)
    assert clipped.shape == (1, 32, 32, 3) and (clipped == 255).all()


def test_the_ledger_is_the_release_then_dp_sgd_composing_to_the_target(members, tmp_path, pretraining_calls):
    _, ledger, config = fit(members, tmp_path)
    central, dp_sgd = ledger.mechanisms
    c = config.params.central
    assert (central.name, central.noise_multiplier, central.steps) == ("central-images", c.sigma, c.releases)
    assert central.sample_rate == c.batch_size / len(members) and central.sensitivity == 28 / c.downsample
    assert dp_sgd.name == "dp-sgd" and 0.99 <= ledger.spent() <= 1.0 + 1e-6
    # What the release spends, DP-SGD does not get: more noise than DPDM's at the same settings.
    dpdm = resolve(METHODS.get("dpdm"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(TINY[:6]))
    alone = PrivacyLedger(1.0, dpdm.delta).calibrate("dp-sgd", "dp-sgd", sample_rate=dp_sgd.sample_rate, steps=dp_sgd.steps)
    assert dp_sgd.noise_multiplier > alone.noise_multiplier
    # Pre-training saw the released images only: augment_copies views of each, under its class.
    (call,) = pretraining_calls
    released = np.load(tmp_path / "central_images.npz")
    assert len(call["images"]) == 2 * len(released["images"]) == 2 * 10 * c.releases
    assert call["labels"].tolist() == np.tile(released["labels"], 2).tolist() and sorted(released["labels"]) == list(range(10))


def test_eps_inf_keeps_the_release_and_trains_without_dp_sgd_noise(members, tmp_path):
    _, ledger, _ = fit(members, tmp_path, epsilon=math.inf)
    central, dp_sgd = ledger.mechanisms
    assert central.noise_multiplier == 10.0 and dp_sgd.noise_multiplier == 0 and math.isinf(ledger.spent())


@pytest.mark.parametrize(
    "sets, complaint",
    [
        (["params.central.downsample=5"], "setting 'params.central.downsample' = 5 does not divide the 28 px side: "
                                          "use a divisor of it, e.g. --set params.central.downsample=4"),
        (["params.central.sigma=0"], "setting 'params.central.sigma' must be"),
        (["params.central.releases=0"], "setting 'params.central.releases' must be a positive integer"),
        (["params.central.augment_copies=-1"], "setting 'params.central.augment_copies' must be a positive integer"),
        (["params.central.batch_size=0"], "setting 'params.central.batch_size' must be a positive integer"),
    ],
)
def test_bad_settings_are_refused_in_one_line_at_validation(sets, complaint):
    with pytest.raises(PrivbenchError) as refused:
        resolved(1.0, sets)
    assert complaint in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_a_batch_larger_than_the_members_is_refused_before_any_release(members, tmp_path):
    with pytest.raises(PrivbenchError) as refused:
        fit(members, tmp_path, extra=["params.central.batch_size=100000"])
    message = str(refused.value)
    assert "'params.central.batch_size' = 100000 exceeds the" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "central_images.npz").exists()


def test_a_smoke_run_through_the_harness_records_every_stage(tmp_path):
    eval_tiny = ["eval.samples=40", "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1",
                 "audit.members=40", "audit.resamples=100"]
    store = Store(tmp_path)
    row = run(resolved(1.0, eval_tiny), store, progress=False)
    assert 0.99 <= row["epsilon"] <= 1.0 + 1e-6
    run_dir = store.run_dir(row["run_id"])
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [m["name"] for m in ledger["mechanisms"]] == ["central-images", "dp-sgd"]
    assert np.load(run_dir / "central_images.npz")["images"].shape == (10, 28, 28, 1)
    costs = store.costs()
    assert list(costs["stage"]) == ["central-images", "pretrain", "dp-train", "sample", "fid", "ca", "audit"]
    assert (costs["wall_s"] > 0).all() and not costs["reused"].any()
