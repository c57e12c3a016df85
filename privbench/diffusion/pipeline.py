"""The one training path of the diffusion methods: build the UNet, pre-train it on public images
(cached), fine-tune it on the members with DP-SGD, sample in the released class mix.

PrivImage, PDP-Diffusion, DP-FETA, DP-FETA-Pro and DPDM differ only in what they pre-train on (the
public classes a private semantic query selects, all public images, privately released central images
of the members, those and then a DP-MERF generator's images, nothing) and in what they release before
DP-SGD; each subclasses `DiffusionMethod` and overrides `pretraining_set` (or `curriculum`, for
several pre-training stages in turn). Everything else, the DP-SGD engine included, is shared, so a
difference in their results is a difference of method, not of code.

Order of privacy spending: every release with a fixed noise scale (the semantic query, the central
images, the class counts) is recorded first; DP-SGD then calibrates its noise to whatever budget they left, so the
composed epsilon meets the target.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from privbench.capabilities import DENOISER
from privbench.checks import (
    DECAY, POSITIVE, POSITIVE_INT, PROBABILITY, Rule, check_fields, each, integer, number, one_of, optional, shown,
)
from privbench.compute import ComputeConfig, autocast, compiled, lay_out
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.data.transforms import to_model, to_uint8
from privbench.diffusion.edm import (
    EDMConfig, diffusion_loss_fn, edm_sampler, per_example_loss, train_plain,
)
from privbench.dp import DPSGDPhase, Mechanism, PrivacyLedger, release_gaussian
from privbench.dp.sgd import GRAD_SAMPLE_MODES
from privbench.dp.distributed import current_world, from_rank0, per_rank
from privbench.errors import PrivbenchError
from privbench.nets.unet import ConditionalUNet, build_unet, norm_groups
from privbench.store import write_atomic

# EDM's published settings (Karras et al. 2022, Table 1), as DPImageBench's diffusion methods use them.
EDM = EDMConfig()


@dataclass(frozen=True)
class UNetConfig:
    base_channels: int
    channel_mult: tuple[int, ...]
    layers_per_block: int
    attention_resolutions: tuple[int, ...]

    def validate(self, where: str = "params.unet.") -> None:
        check_fields(self, where, base_channels=POSITIVE_INT, channel_mult=each(POSITIVE_INT), layers_per_block=POSITIVE_INT,
                     attention_resolutions=each(POSITIVE_INT, empty=True))
        widths = tuple(self.base_channels * m for m in self.channel_mult)
        if not norm_groups(widths):
            raise PrivbenchError(f"settings '{where}base_channels' x '{where}channel_mult' give channel widths {widths} "
                                 f"without a common GroupNorm group count: e.g. --set {where}base_channels=32")

    def levels(self, resolution: int) -> tuple[int, ...]:
        """The side of each level of the UNet at `resolution` (build_unet halves it once per level)."""
        return tuple(resolution // 2**i for i in range(len(self.channel_mult)))

    def check_resolution(self, resolution: int, where: str = "params.unet.") -> None:
        """The UNet at the run's resolution: it halves evenly at every level and attends only at levels
        it has. build_unet would otherwise drop an attention resolution it never reaches, silently."""
        halvings = len(self.channel_mult) - 1
        if resolution % 2**halvings:
            fewer = self.channel_mult[:1 + _halvings(resolution)]
            raise PrivbenchError(f"setting '{where}channel_mult' gives {halvings + 1} UNet levels, which halve a "
                                 f"{resolution} px image unevenly: use at most {len(fewer)}, e.g. --set {where}channel_mult={shown(fewer)}")
        levels = self.levels(resolution)
        if absent := [r for r in self.attention_resolutions if r not in levels]:
            nearest = sorted({min(levels, key=lambda level: abs(level - r)) for r in self.attention_resolutions}, reverse=True)
            raise PrivbenchError(f"setting '{where}attention_resolutions' has {shown(tuple(absent))}, which is no level of the "
                                 f"UNet at {resolution} px (its levels: {', '.join(map(str, levels))}): attend at levels it "
                                 f"has, e.g. --set {where}attention_resolutions={shown(tuple(nearest))}")


def _halvings(resolution: int) -> int:
    """How many times `resolution` halves evenly."""
    return (resolution & -resolution).bit_length() - 1


@dataclass(frozen=True)
class PretrainConfig:
    steps: int  # Adam steps on public batches drawn with replacement
    batch_size: int
    lr: float
    ema_decay: float  # fine-tuning starts from the EMA weights
    label_dropout: float  # share of rows trained unconditionally, for classifier-free guidance

    def validate(self, where: str = "params.pretrain.") -> None:
        check_fields(self, where, steps=POSITIVE_INT, batch_size=POSITIVE_INT, lr=POSITIVE, ema_decay=DECAY,
                     label_dropout=PROBABILITY)


@dataclass(frozen=True)
class DPTrainConfig:
    logical_batch: int  # expected Poisson batch; sample rate q = logical_batch / members
    physical_batch: int | None  # examples per forward pass (memory only); null: the largest that fits
    epochs: float  # steps = round(epochs / q)
    clip_norm: float
    lr: float
    multiplicity: int  # noise draws averaged per example before clipping (DPDM's noise multiplicity)
    grad_sample_mode: str  # functorch | hooks | ghost | bookkeeping (see privbench.dp.sgd)
    ema_decay: float
    label_dropout: float

    def validate(self, where: str = "params.dp.") -> None:
        check_fields(
            self, where, logical_batch=POSITIVE_INT, physical_batch=optional(POSITIVE_INT, "the largest that fits"),
            epochs=POSITIVE, clip_norm=POSITIVE, lr=POSITIVE, multiplicity=POSITIVE_INT,
            grad_sample_mode=one_of(GRAD_SAMPLE_MODES), ema_decay=DECAY, label_dropout=PROBABILITY,
        )
        if self.grad_sample_mode == "ghost" and self.multiplicity > 1:
            raise PrivbenchError(f"setting '{where}multiplicity' must be 1 under ghost clipping, which clips each noise draw "
                                 f"alone, got {self.multiplicity}: e.g. --set {where}grad_sample_mode=bookkeeping")


@dataclass(frozen=True)
class SamplerConfig:
    steps: int  # noise levels of EDM's deterministic Heun sampler (2 * steps - 1 network calls)
    guidance: float  # classifier-free guidance weight; 1.0 is plain conditional sampling
    batch_size: int

    def validate(self, where: str = "params.sampler.") -> None:
        check_fields(self, where, steps=integer(2), guidance=number(0), batch_size=POSITIVE_INT)


@dataclass(frozen=True)
class DiffusionConfig:
    unet: UNetConfig
    dp: DPTrainConfig
    sampler: SamplerConfig
    # Noise multiplier of a Gaussian release of the member count per class (sensitivity 1), whose
    # proportions the samples follow; None samples classes uniformly (DPImageBench's balanced
    # synthetic sets) and spends nothing.
    class_counts_sigma: float | None

    def validate(self, where: str = "params.", **rules: Rule) -> None:
        """The settings of this and every nested part (unet, dp, sampler, and a subclass's own); a
        subclass passes the `rules` of its own plain fields."""
        check_fields(self, where, class_counts_sigma=optional(POSITIVE, "uniform classes (no release)"), **rules)

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        self.unet.check_resolution(resolution, f"{where}unet.")


@dataclass(frozen=True)
class PretrainedDiffusionConfig(DiffusionConfig):
    pretrain: PretrainConfig


def build_model(unet: UNetConfig, task: Task, ctx: RunContext, shape: tuple[int, int] | None = None,
                num_classes: int | None = None) -> ConditionalUNet:
    """The run's class-conditional UNet on (channels, side) inputs (default: the task's images) with
    `num_classes` class embeddings besides the unconditional one (default: the task's classes),
    initialised from the run seed."""
    channels, side = shape or (task.channels, task.resolution)
    torch.manual_seed(ctx.stage_seed("unet-init"))
    return build_unet(
        side, channels, num_classes or len(task.classes), unet.base_channels, unet.channel_mult,
        unet.layers_per_block, unet.attention_resolutions,
    ).to(ctx.device)


def release_class_proportions(task: Task, ledger: PrivacyLedger, sigma: float | None, ctx: RunContext) -> torch.Tensor:
    """The class mix samples follow: noisy member counts per class (one Gaussian release in the
    ledger: adding or removing a member moves one count by 1), or uniform when `sigma` is None."""
    n_classes = len(task.classes)
    if sigma is None:
        return torch.full((n_classes,), 1 / n_classes)
    counts = torch.bincount(torch.from_numpy(task.members.labels), minlength=n_classes).double()
    mechanism = Mechanism("class-counts", "gaussian", sigma, sensitivity=1.0)
    noisy = release_gaussian(ledger, mechanism, counts, ctx.mechanism_generator("class-counts")).clamp(min=0).float()
    return noisy / noisy.sum() if noisy.sum() > 0 else torch.full((n_classes,), 1 / n_classes)


def architecture(model: ConditionalUNet) -> list:
    """What identifies the network in cache keys: its class and public settings. diffusers' private
    entries (e.g. `_use_default_values`, a list in set order) differ from process to process."""
    settings = {k: v for k, v in model.unet.config.items() if not k.startswith("_")}
    return [type(model.unet).__name__, settings, model.num_classes]


def weights_digest(model: nn.Module) -> str:
    """A hash of `model`'s weights: names a pre-training stage's result in the next stage's cache key."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def key_digest(key: list) -> str:
    """The name a cache key's result is stored under: its JSON text, hashed."""
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]


def cached_training(model: nn.Module, kind: str, key: list, stage: str, train: Callable[[], None], ctx: RunContext) -> None:
    """Load into `model` the weights cached for `key` under `ctx.cache_dir / kind`, or run `train`
    (which leaves the final weights in `model`) as the cost stage `stage` and cache its result.

    `key` lists everything the weights depend on (public content hash, architecture, settings, seed,
    compute); only public data may enter, since a cached result is shared by every run asking again.
    A hit records the original cost, marked reused. Under torchrun every rank takes rank 0's view of
    the cache and only rank 0 writes it.
    """
    path = ctx.cache_dir / kind / f"{key_digest(key)}.pt"
    if from_rank0(path.exists()):
        saved = torch.load(path, map_location=ctx.device, weights_only=False)
        model.load_state_dict(saved["state"])
        ctx.costs.reused(stage, saved["cost"])
        ctx.log.info("%s reused from %s", stage, path)
        return
    with ctx.stage(stage) as record:
        train()
        record.params = model
    if current_world().main:
        buffer = io.BytesIO()
        torch.save({"state": model.state_dict(), "cost": ctx.costs.records()[-1]}, buffer)
        write_atomic(path, buffer.getvalue())
    ctx.log.info("%s done in %d process(es), cached at %s", stage, current_world().size, path)


def pretrain(model: ConditionalUNet, public: ImageSet, conditional: bool, config: PretrainConfig, ctx: RunContext,
             stage: str = "pretrain", continued: bool = False) -> None:
    """Load into `model` the EMA weights of non-private training on `public` (no member is read).

    With `conditional`, `public.labels` are sensitive class indices (PrivImage's relabelled
    selection); otherwise every image carries the unconditional label. The result is cached under a
    hash of the public images and labels, the architecture, the settings and the run seed, so every
    epsilon (and every method) asking for the same pre-training loads it instead of training again;
    the cost stage `stage` then shows the original cost, marked reused. A `continued` stage trains
    on from the weights an earlier stage left in `model`, and its key names those weights too, so
    that two curricula whose earlier stages differ never share a later stage's cache.
    """
    key = [public.content_hash(), conditional, architecture(model), asdict(config), ctx.seed, asdict(ctx.compute)]
    if continued:
        key.append(weights_digest(model))
    labels = public.labels if conditional else np.full(len(public), model.unconditional_label)
    cached_training(model, "diffusion-pretrain", key, stage,
                    lambda: train_denoiser(model, to_model(public.images), labels, config, ctx), ctx)


def train_denoiser(model: ConditionalUNet, x: torch.Tensor, labels: np.ndarray, config: PretrainConfig, ctx: RunContext) -> None:
    """Non-private EDM training of `model` on public `x` (images or latents) under `labels`; leaves its
    EMA weights in `model`."""
    _, ema = train_plain(
        model, diffusion_loss_fn(EDM, ctx.device_generator(per_rank("pretrain-draws")), config.label_dropout),
        (x, torch.as_tensor(labels, dtype=torch.int64)),
        steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        generator=ctx.generator("pretrain-batches"), ema_decay=config.ema_decay, progress=ctx.progress,
        compute=ctx.compute,
    )
    model.load_state_dict(ema.state_dict())


def fine_tune(model: ConditionalUNet, members: tuple[torch.Tensor, torch.Tensor], ledger: PrivacyLedger, config: DPTrainConfig,
              ctx: RunContext) -> nn.Module:
    """DP-SGD on the members (model inputs and labels) through the shared engine, on the parameters of
    `model` that require gradients; returns the EMA of the private iterates."""
    loss_fn = diffusion_loss_fn(EDM, ctx.device_generator(per_rank("dp-train-draws")), config.label_dropout)
    with ctx.stage("dp-train") as stage:
        with DPSGDPhase(
            model, members, ledger, ctx,
            name="dp-sgd", logical_batch=config.logical_batch, physical_batch=config.physical_batch,
            epochs=config.epochs, clip_norm=config.clip_norm, lr=config.lr, multiplicity=config.multiplicity,
            grad_sample_mode=config.grad_sample_mode, ema_decay=config.ema_decay,
        ) as phase:
            for batch in phase.logical_batches():
                phase.step(loss_fn, batch)
        stage.params = phase.result.ema
    return phase.result.ema


class DiffusionSynthesizer:
    """Samples of the fine-tuned model, labels drawn in the released class proportions."""

    capabilities = frozenset({DENOISER})

    def __init__(self, net: ConditionalUNet, proportions: torch.Tensor, task: Task, sampler: SamplerConfig, progress: bool,
                 compute: ComputeConfig = ComputeConfig()):
        self.net, self.proportions, self.sampler, self.progress = net.eval(), proportions, sampler, progress
        self.compute, self.forward = compute, compiled(lay_out(self.net, compute), compute)
        self.classes, self.shape = task.classes, (task.channels, task.resolution, task.resolution)

    def sample(self, n: int, labels: np.ndarray | None = None, generator: torch.Generator | None = None) -> ImageSet:
        if labels is None:
            labels = torch.multinomial(self.proportions, n, replacement=True, generator=generator).numpy()
        device = next(self.net.parameters()).device
        images, size = [], self.sampler.batch_size
        for start in tqdm(range(0, n, size), desc="sample", disable=None if self.progress else True, leave=False):
            y = torch.as_tensor(labels[start : start + size], dtype=torch.int64, device=device)
            with autocast(device, self.compute):
                x = edm_sampler(self.forward, y, (len(y), *self.shape), EDM, self.sampler.steps, generator, self.sampler.guidance)
            images.append(to_uint8(self.to_images(x)))
        return ImageSet(np.concatenate(images), np.asarray(labels, np.int64), self.classes, "diffusion samples")

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's output as images in model range (a latent model decodes it)."""
        return x

    @torch.no_grad()
    def loss(self, images: ImageSet, sigma: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
        """Per-example denoising loss at the given noise levels and noises (white-box attacks' probe)."""
        device = next(self.net.parameters()).device
        x, y = to_model(images.images).to(device), torch.from_numpy(images.labels).to(device)
        return per_example_loss(self.net, x, y, sigma.to(device), noise.to(device), EDM).cpu().numpy()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "proportions": self.proportions}


@dataclass(frozen=True)
class CurriculumStage:
    """One pre-training stage: its images, whether their labels are sensitive classes, its settings,
    and the name of its cost stage."""

    images: ImageSet
    conditional: bool
    config: PretrainConfig
    name: str


class DiffusionMethod:
    """fit = releases with fixed noise -> optional public pre-training -> DP-SGD fine-tuning.

    Subclasses set `name`, `Config`, `uses_public` and override `pretraining_set` or `curriculum`.
    """

    name: str
    Config: type
    uses_public: bool
    trains_with_dp_sgd = True  # its fine-tuning is a DPSGDPhase, which an audited run plants canaries in
    preset_files: tuple[str, ...]

    def __init__(self, config: DiffusionConfig):
        self.config = config

    def pretraining_set(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> tuple[ImageSet, bool] | None:
        """(public images, whether their labels are sensitive classes) to pre-train on, or None.
        May record fixed-noise releases in `ledger`: it runs before DP-SGD is calibrated."""
        return None

    def curriculum(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> list[CurriculumStage]:
        """The pre-training stages, in the order they train: by default `pretraining_set` under
        `pretrain`, or none. May record fixed-noise releases, as `pretraining_set` may."""
        public = self.pretraining_set(task, ledger, ctx)
        return [] if public is None else [CurriculumStage(*public, self.config.pretrain, "pretrain")]

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> DiffusionSynthesizer:
        c = self.config
        stages = self.curriculum(task, ledger, ctx)
        proportions = release_class_proportions(task, ledger, c.class_counts_sigma, ctx)
        model = build_model(c.unet, task, ctx)
        for i, s in enumerate(stages):
            pretrain(model, s.images, s.conditional, s.config, ctx, stage=s.name, continued=i > 0)
        net = fine_tune(model, (to_model(task.members.images), torch.from_numpy(task.members.labels)), ledger, c.dp, ctx)
        eps = ledger.spent()
        ctx.log.info("%s fitted: composed epsilon %s", self.name, "inf" if math.isinf(eps) else f"{eps:.4g}")
        return DiffusionSynthesizer(net, proportions, task, c.sampler, ctx.progress, ctx.compute)

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> DiffusionSynthesizer:
        model = build_model(self.config.unet, task, ctx)
        model.load_state_dict(state["model"])
        return DiffusionSynthesizer(model, state["proportions"], task, self.config.sampler, ctx.progress, ctx.compute)
