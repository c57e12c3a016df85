"""DP-LDM and DP-LoRA through the latent pipeline: the autoencoder's cache, what DP-SGD trains and
what stays frozen, that the members enter through DP-SGD alone with the ledger's noise, the
Stable Diffusion autoencoder path with a tiny stand-in, and a run through the harness."""

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from privbench.config import parse_overrides, resolve
from privbench.context import RunContext, Task
from privbench.data import load, make_split
from privbench.data.transforms import to_model
from privbench.diffusion import latent, pipeline
from privbench.dp import PrivacyLedger
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.metrics import CostRecorder
from privbench.nets.unet import attention_modules

# Real settings at a size that fits seconds on a 2-core CPU: 3 autoencoder, 3 pre-training and 3 DP-SGD steps.
TINY = [
    "params.autoencoder.base_channels=8", "params.autoencoder.steps=3", "params.autoencoder.batch_size=16",
    "params.unet.base_channels=8", "params.pretrain.steps=3", "params.pretrain.batch_size=16",
    "params.dp.logical_batch=32", "params.dp.physical_batch=32", "params.dp.epochs=0.06",
    "params.sampler.steps=2", "params.sampler.batch_size=16",
]


def method(name, epsilon=1.0, extra=()):
    cls = METHODS.get(name)
    config = resolve(cls, "mnist", epsilon, 0, "smoke", "cpu", parse_overrides([*TINY, *extra]))
    return cls(config.params), config


@pytest.fixture(scope="module")
def task():
    train = load("mnist", "train")
    members = train.subset(make_split(train.labels, 0).members)
    return Task(members, load("glyphs", "train", size=62 * 4), train.classes)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def context(tmp_path, cache):
    return RunContext(tmp_path, cache, torch.device("cpu"), 0, progress=False, costs=CostRecorder())


class RecordingPhase(pipeline.DPSGDPhase):
    """The DP-SGD phase, kept for inspection once it has run."""

    last = None

    def __exit__(self, *exc):
        RecordingPhase.last = self
        return super().__exit__(*exc)


@pytest.fixture
def trainer_calls(monkeypatch):
    """The rows of every non-private training (autoencoder and pre-training), the labels of each
    pre-training, and every DP-SGD phase."""
    calls = {"plain": [], "labels": [], "dp": []}
    real = latent.train_plain

    def spy(model, loss_fn, tensors, **kwargs):
        calls["plain"].append(tensors[0].clone())
        calls["labels"].extend(t.clone() for t in tensors[1:])
        return real(model, loss_fn, tensors, **kwargs)

    monkeypatch.setattr(latent, "train_plain", spy)
    monkeypatch.setattr(pipeline, "train_plain", spy)
    monkeypatch.setattr(pipeline, "DPSGDPhase", RecordingPhase)
    return calls


def fit(name, task, cache, tmp_path, epsilon=1.0, extra=()):
    instance, config = method(name, epsilon, extra)
    ledger = PrivacyLedger(epsilon, config.delta)
    ctx = context(tmp_path, cache)
    return instance.fit(task, ledger, ctx), ledger, ctx


@pytest.fixture(scope="module")
def fitted(task, cache, tmp_path_factory):
    """One fit of each method at eps 1, with the pre-trained UNet it started from and its DP-SGD phase."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "DPSGDPhase", RecordingPhase)
        for name in ("dp-ldm", "dp-lora"):
            synthesizer, ledger, ctx = fit(name, task, cache, tmp_path_factory.mktemp(name))
            out[name] = synthesizer, ledger, ctx, RecordingPhase.last
    return out


def pretrained(task, cache, tmp_path, name="dp-ldm"):
    """The pre-trained UNet the fits started from (a cache hit: no training)."""
    instance, _ = method(name)
    ctx = context(tmp_path, cache)
    coder, coder_id = instance.coder(task, ctx)
    model = pipeline.build_model(instance.config.unet, task, ctx, instance.latent_shape(task, coder)[:2], instance.class_embeddings(task))
    key = instance.pretraining_key(task.public, coder_id, model, ctx)
    pipeline.cached_training(model, "diffusion-pretrain", key, "pretrain", lambda: pytest.fail("pre-training ran again"), ctx)
    return model


@pytest.mark.parametrize("name", ["dp-ldm", "dp-lora"])
def test_the_ledger_holds_one_dp_sgd_phase_whose_noise_is_the_noise_used(fitted, name):
    _, ledger, ctx, phase = fitted[name]
    (mechanism,) = ledger.mechanisms
    assert (mechanism.name, mechanism.kind) == ("dp-sgd", "dp-sgd")
    assert 0.99 <= ledger.spent() <= 1.0 + 1e-6
    assert phase.mechanism is mechanism
    assert phase.optimizer.noise_multiplier == mechanism.noise_multiplier > 0
    assert phase.optimizer.max_grad_norm == mechanism.sensitivity == phase.clip_norm
    assert phase.taken == mechanism.steps
    stages = [r["name"] for r in ctx.costs.records()]
    assert stages[-1] == "dp-train" and set(stages) <= {"autoencoder", "pretrain", "dp-train"}


def test_members_enter_only_through_dp_sgd(task, cache, tmp_path, trainer_calls):
    """Other members, same public set: the autoencoder and the pre-training are the cached ones (no
    non-private training runs), so neither depends on a member; DP-SGD trains on the members' latents."""
    train = load("mnist", "train")
    others = dataclasses.replace(task, members=train.subset(make_split(train.labels, 1).members))
    fit("dp-ldm", task, cache, tmp_path)
    trainer_calls["plain"].clear()
    _, ledger, _ = fit("dp-ldm", others, cache, tmp_path)
    assert trainer_calls["plain"] == []
    phase = RecordingPhase.last
    assert len(phase.members[0]) == len(others.members) and phase.members[0].shape[1:] == (3, 14, 14)
    torch.testing.assert_close(phase.members[1], torch.from_numpy(others.members.labels))


def test_a_members_latent_depends_on_that_member_alone(task, cache, tmp_path):
    """Encoding is deterministic and row by row, so one member is one DP-SGD row."""
    instance, _ = method("dp-ldm")
    coder, _ = instance.coder(task, context(tmp_path, cache))
    images = task.members.images[:6]
    together = latent.encode(coder, images, torch.device("cpu"))
    alone = torch.cat([latent.encode(coder, images[i : i + 1], torch.device("cpu")) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent.encode(coder, images, torch.device("cpu")), together, rtol=0, atol=0)


def test_dp_ldm_trains_attention_and_the_class_embedding_only(fitted, task, cache, tmp_path):
    synthesizer, *_ = fitted["dp-ldm"]
    start = pretrained(task, cache, tmp_path)
    trained_modules = [*attention_modules(start), start.unet.class_embedding]
    trained = {id(p) for m in trained_modules for p in m.parameters()}
    names = {n for n, p in start.named_parameters() if id(p) in trained}
    after = dict(synthesizer.net.named_parameters())
    for name, p in start.named_parameters():
        if name in names:
            continue
        assert torch.equal(after[name], p), f"{name} moved but DP-LDM freezes it"
    assert any(not torch.equal(after[n], p) for n, p in start.named_parameters() if n in names)
    assert any("attentions" in n for n in names) and "unet.class_embedding.weight" in names


def test_dp_ldm_tunes_attention_from_the_configured_module(task):
    instance, _ = method("dp-ldm", extra=["params.tuned_attention_from=2", "params.unet.attention_resolutions=[14,7]"])
    model = pipeline.build_model(instance.config.unet, task, context(None, None), (3, 14))
    instance.prepare(model, context(None, None))
    modules = attention_modules(model)
    assert [any(p.requires_grad for p in m.parameters()) for m in modules] == [False] + [True] * (len(modules) - 1)
    # LDM's order: down path, middle, up path
    assert modules.index(model.unet.mid_block.attentions[0]) == len(model.unet.down_blocks[1].attentions) + 1


def test_dp_lora_keeps_every_pretrained_weight_but_the_class_embedding_bit_identical(fitted, task, cache, tmp_path):
    synthesizer, *_ = fitted["dp-lora"]
    start = pretrained(task, cache, tmp_path, "dp-lora")
    after = dict(synthesizer.net.named_parameters())
    adapters = {n: p for n, p in after.items() if ".down." in n or ".up." in n}
    assert len(adapters) == 2 * 4 * len(attention_modules(start))  # q, k, v and out of every attention module
    for name, p in start.named_parameters():
        adapted = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        now = after.get(name, after.get(adapted))
        if name == "unet.class_embedding.weight":
            assert not torch.equal(now, p)
        else:
            assert torch.equal(now, p), f"{name} moved but DP-LoRA freezes it"
    assert any(p.abs().sum() > 0 for n, p in adapters.items() if ".up." in n)  # B left zero and was trained
    trained = [n for n, p in synthesizer.net.named_parameters() if p.requires_grad]
    assert set(trained) <= set(adapters) | {"unet.class_embedding.weight"}


@pytest.mark.parametrize("name", ["dp-ldm", "dp-lora"])
def test_samples_decode_to_images_and_restore_exactly(fitted, task, name):
    synthesizer, _, ctx, _ = fitted[name]
    assert synthesizer.capabilities == frozenset()  # a latent net is no pixel denoiser
    samples = synthesizer.sample(10, generator=torch.Generator().manual_seed(3))
    assert samples.images.shape == (10, 28, 28, 1) and samples.images.dtype == np.uint8
    instance, _ = method(name)
    again = instance.restore(synthesizer.state_dict(), task, ctx).sample(10, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(again.images, samples.images)
    with pytest.raises(PrivbenchError, match="latents, not images"):
        synthesizer.loss(task.members.subset(np.arange(2)), torch.ones(2), torch.zeros(2, 1, 28, 28))


def test_the_latent_unet_pre_trains_on_the_public_labels_with_an_embedding_per_public_class(task, tmp_path, trainer_calls):
    """As LDM's class-conditional pre-training: the public labels condition it, so sensitive class k
    fine-tunes public class k's trained embedding; unconditional pre-training is a setting away, and the
    two never share a cache."""
    synthesizer, _, _ = fit("dp-ldm", task, tmp_path / "cache", tmp_path)
    assert len(task.public.classes) == 62 > len(task.classes)
    assert synthesizer.net.num_classes == 62
    torch.testing.assert_close(trainer_calls["labels"][0], torch.from_numpy(task.public.labels))
    fit("dp-ldm", task, tmp_path / "cache", tmp_path, extra=["params.conditional_pretraining=false"])
    assert len(trainer_calls["labels"]) == 2  # a miss: trained again, without the labels
    assert set(trainer_calls["labels"][1].tolist()) == {len(task.classes)}  # the unconditional label


def test_the_autoencoder_is_cached_by_public_content_and_settings(task, tmp_path, trainer_calls):
    _, config = method("dp-ldm")
    settings = config.params.autoencoder
    cache = tmp_path / "cache"
    first = latent.fit_autoencoder(task.public, settings, context(tmp_path, cache))
    assert len(trainer_calls["plain"]) == 1
    again = latent.fit_autoencoder(task.public, settings, context(tmp_path, cache))
    assert len(trainer_calls["plain"]) == 1  # a hit: no training
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert first.latent_scale != 1  # set from the public latents, and cached with the weights
    latent.fit_autoencoder(task.public.subset(np.arange(100)), settings, context(tmp_path, cache))
    assert len(trainer_calls["plain"]) == 2  # other public images: a miss
    latent.fit_autoencoder(task.public, dataclasses.replace(settings, kl_weight=0.0), context(tmp_path, cache))
    assert len(trainer_calls["plain"]) == 3  # another setting: a miss
    assert len(list((cache / "autoencoder").iterdir())) == 3


def test_pretraining_keeps_its_cache_file_name(task, tmp_path):
    """Committed cells' pre-training caches stay valid: the key text is the one they were written under."""
    instance, config = method("dp-ldm")
    ctx = context(tmp_path, tmp_path / "cache")
    model = pipeline.build_model(instance.config.unet, task, ctx, (1, 28))
    settings = instance.config.pretrain
    key_text = json.dumps([task.public.content_hash(), False, pipeline.architecture(model), dataclasses.asdict(settings), ctx.seed,
                           dataclasses.asdict(ctx.compute)], default=str)
    pipeline.pretrain(model, task.public, False, settings, ctx)
    assert (tmp_path / "cache" / "diffusion-pretrain" / f"{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.pt").exists()


def tiny_vae(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=28).save_pretrained(folder / "vae")
    return folder


def test_dp_ldm_sd_uses_a_local_autoencoder_kl_instead_of_training_one(task, tmp_path, trainer_calls):
    folder = tiny_vae(tmp_path / "sd")
    synthesizer, ledger, ctx = fit("dp-ldm", task, tmp_path / "cache", tmp_path, extra=[f"params.pretrained_vae={folder}"])
    assert [r["name"] for r in ctx.costs.records()] == ["pretrain", "dp-train"]  # no autoencoder training
    assert len(trainer_calls["plain"]) == 1 and trainer_calls["plain"][0].shape[1:] == (4, 14, 14)
    assert RecordingPhase.last.members[0].shape[1:] == (4, 14, 14)
    assert ledger.spent() <= 1.0 + 1e-6
    samples = synthesizer.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.images.shape == (4, 28, 28, 1)
    x = to_model(task.members.images[:2])
    vae = synthesizer.coder.vae
    torch.testing.assert_close(synthesizer.coder.encode(x), vae.encode(x.expand(-1, 3, -1, -1)).latent_dist.mean * vae.config.scaling_factor)


@pytest.mark.parametrize("setup, message", [
    (lambda d: d, "no vae/config.json"),
    (lambda d: (d / "vae").mkdir(parents=True) or (d / "vae" / "config.json").write_text('{"_class_name": "UNet2DModel"}') and d,
     "not an AutoencoderKL"),
])
def test_a_pretrained_vae_that_is_none_is_refused_before_any_work(tmp_path, setup, message):
    folder = setup(tmp_path / "sd")
    with pytest.raises(PrivbenchError, match=f"params.pretrained_vae.*{message}") as refused:
        method("dp-ldm", extra=[f"params.pretrained_vae={folder}"])
    assert "\n" not in str(refused.value)


def test_an_autoencoder_that_cannot_halve_the_images_is_refused():
    with pytest.raises(PrivbenchError, match="params.autoencoder.channel_mult.*28 px"):
        method("dp-lora", extra=["params.autoencoder.channel_mult=[1,2,2,2]"])
    with pytest.raises(PrivbenchError, match="params.lora_rank"):
        method("dp-lora", extra=["params.lora_rank=0"])
    with pytest.raises(PrivbenchError, match="params.unet.attention_resolutions"):
        method("dp-ldm", extra=["params.unet.attention_resolutions=[28]"])  # image side, not the 14 px latent's


def test_a_dp_lora_run_through_the_harness(tmp_path):
    from privbench.harness import run
    from privbench.store import Store

    eval_tiny = ["eval.samples=40", "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1",
                 "data.public_size=248", "audit.members=40", "audit.resamples=100"]
    config = resolve(METHODS.get("dp-lora"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides([*TINY, *eval_tiny]))
    store = Store(tmp_path)
    row = run(config, store, progress=False)
    assert 0.99 <= row["epsilon"] <= 1.0 + 1e-6
    costs = store.costs()
    assert list(costs["stage"])[:3] == ["autoencoder", "pretrain", "dp-train"]
    audit = json.loads((store.run_dir(row["run_id"]) / "audit.json").read_text())
    assert "loss" not in audit and "nearest" in audit  # black-box attacks only
    assert math.isfinite(store.runs().loc[0, "fid"])


def test_an_audited_dp_lora_run_plants_its_canaries_in_the_latent_dp_sgd_phase(tmp_path, capsys):
    """Canary examples are latent rows and gradient canaries directions over the trained parameters only;
    the phase's mechanism checks pass on the honest engine."""
    from privbench.cli import main
    from privbench.harness import run
    from privbench.store import Store

    sets = [*TINY, "audit.canaries=200", "audit.canary_examples=8", "data.public_size=248"]
    config = resolve(METHODS.get("dp-lora"), "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(sets))
    store = Store(tmp_path)
    row = run(config, store, progress=False)
    capsys.readouterr()
    assert main(["check", "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    report = json.loads((store.run_dir(row["run_id"]) / "canaries.json").read_text())
    assert set(report["threat_models"]) == {"gradient", "example", "final-model"}
