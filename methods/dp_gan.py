"""DP-GAN: a GAN whose discriminator trains with DP-SGD (Xie, Lin, Wang, Wang and Zhou 2018, arXiv:1802.06739).

The discriminator D is the only network that reads members: it trains in a DPSGDPhase, with the
hinge loss of the GAN (Lim and Ye 2017, as DPImageBench's DP-GAN). Every `d_updates` private steps
the generator G takes one non-private step against the current D, read through `phase.frozen()`: D's
parameters are a function of the noisy releases so far, so G's training is post-processing.

What is inside each member's clipped contribution, and why it bounds the sensitivity: the per-example
loss of member (x, y) is relu(1 - D(x, y)) + relu(1 + D(G(z, c), c)), its real term plus the term of
one generated image drawn for it (z and c fresh, independent of every member). Both terms are inside
the one gradient the engine clips to `clip_norm`. The generated term must be paired with a member:
were generated images a separate part of the sum, their number would follow the Poisson batch's size,
which depends on membership, and the sum would move by more than one clipped gradient. G normalises
each image on its own (ConvGenerator with norm "layer") and D has no batch statistics, so neither the
member's score nor its generated partner depends on anything else in the batch. Adding or removing a
member therefore adds or removes exactly one clipped vector of norm <= clip_norm: the sensitivity of
the subsampled Gaussian mechanism the ledger records (q = logical_batch / members, the phase's steps).

Samples take uniformly drawn labels: DP-GAN releases no class counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from privbench.checks import DECAY, POSITIVE, POSITIVE_INT, Rule, each, one_of, optional
from privbench.context import RunContext, Task
from privbench.data.transforms import to_model
from privbench.dp import DPSGDPhase, PrivacyLedger
from privbench.methods import METHODS, mean_embedding
from privbench.nets.discriminators import ConvDiscriminator
from privbench.nets.generators import ConvGenerator

# D is called twice per example (its real and its generated image): Opacus' per-sample gradient
# modes accumulate both calls per example; ghost and book-keeping clipping assume one call.
GAN_GRAD_SAMPLE_MODES = ("functorch", "hooks")
BETAS = Rule(lambda v: isinstance(v, tuple) and len(v) == 2 and all(DECAY.holds(b) for b in v),
             "two Adam decay rates, each in [0, 1)")


@dataclass(frozen=True)
class DPGANConfig(mean_embedding.GeneratorConfig):
    d_channels: tuple[int, ...]  # ConvDiscriminator's widths, one stride-2 block each
    d_lr: float
    logical_batch: int  # expected Poisson batch of D's private steps
    physical_batch: int | None  # examples per forward pass (memory only); null: the largest that fits
    epochs: float  # D's private steps = round(epochs / q)
    clip_norm: float
    d_updates: int  # private D steps per generator step
    grad_sample_mode: str
    betas: tuple[float, float]  # both networks' Adam moment decays

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "d_channels": each(POSITIVE_INT), "d_lr": POSITIVE, "logical_batch": POSITIVE_INT,
                "physical_batch": optional(POSITIVE_INT, "the largest that fits"), "epochs": POSITIVE,
                "clip_norm": POSITIVE, "d_updates": POSITIVE_INT, "grad_sample_mode": one_of(GAN_GRAD_SAMPLE_MODES),
                "betas": BETAS}

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        super().check_resolution(resolution, where)
        mean_embedding.check_discriminator(self.d_channels, resolution, where)


def discriminator_hinge(d_real: torch.Tensor, d_generated: torch.Tensor) -> torch.Tensor:
    """D's hinge loss per row: relu(1 - D(real)) + relu(1 + D(generated))."""
    return F.relu(1.0 - d_real) + F.relu(1.0 + d_generated)


def generate(generator: ConvGenerator, n: int, draws: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images in [-1, 1] (the members' scale) and their labels, both drawn uniformly from `draws`."""
    device = next(generator.parameters()).device
    labels = torch.randint(generator.num_classes, (n,), generator=draws, device=draws.device).to(device)
    z = torch.randn(n, generator.z_dim, generator=draws, device=draws.device).to(device)
    return generator(z, labels) * 2 - 1, labels


def discriminator_loss(generator: ConvGenerator, draws: torch.Generator):
    """D's per-example loss for the DPSGDPhase: each member's hinge terms, its real image's and those of
    one image generated for it (drawn without gradient to G), in the one gradient that is clipped."""

    def loss(d: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            generated, generated_labels = generate(generator, len(images), draws)
        return discriminator_hinge(d(images, labels), d(generated, generated_labels))

    return loss


def generator_step(generator: ConvGenerator, discriminator: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   batch_size: int, draws: torch.Generator) -> float:
    """One non-private step of G on the hinge loss -mean D(G(z, c), c); returns the loss."""
    images, labels = generate(generator, batch_size, draws)
    loss = -discriminator(images, labels).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def gan_generator(config: mean_embedding.GeneratorConfig, task: Task, ctx: RunContext) -> ConvGenerator:
    """A GAN's generator for the task's images: each image normalised on its own (see the docstring)."""
    return ConvGenerator(config.z_dim, len(task.classes), task.resolution, task.channels, config.hidden, config.channels,
                         config.kernel_size, norm="layer").to(ctx.device)


def uniform_synthesizer(generator: ConvGenerator, task: Task, config: mean_embedding.GeneratorConfig,
                        name: str) -> mean_embedding.GeneratorSynthesizer:
    """Samples of a GAN's generator with uniformly drawn labels: the GANs release no class counts."""
    uniform = torch.full((len(task.classes),), 1 / len(task.classes))
    return mean_embedding.GeneratorSynthesizer(generator, uniform, task.classes, config.sample_batch_size, name)


def networks(config: DPGANConfig, task: Task, ctx: RunContext) -> tuple[ConvGenerator, ConvDiscriminator]:
    """G and D for the task's images, initialised from the run seed."""
    torch.manual_seed(ctx.stage_seed("gan-init"))
    generator = gan_generator(config, task, ctx)
    discriminator = ConvDiscriminator(task.resolution, task.channels, len(task.classes), config.d_channels).to(ctx.device)
    return generator, discriminator


@METHODS.register("dp-gan")
class DPGAN:
    name = "dp-gan"
    Config = DPGANConfig
    uses_public = False
    trains_with_dp_sgd = True  # D trains in a DPSGDPhase, which an audited run plants canaries in

    def __init__(self, config: DPGANConfig):
        self.config = config

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> mean_embedding.GeneratorSynthesizer:
        c = self.config
        generator, discriminator = networks(c, task, ctx)
        g_optimizer = torch.optim.Adam(generator.parameters(), lr=c.lr, betas=c.betas)
        draws = ctx.device_generator("gan-draws")
        d_loss = discriminator_loss(generator, draws)
        members = (to_model(task.members.images), torch.from_numpy(task.members.labels))
        with ctx.stage("fit") as stage:
            with DPSGDPhase(discriminator, members, ledger, ctx, name="dp-sgd", logical_batch=c.logical_batch,
                            physical_batch=c.physical_batch, epochs=c.epochs, clip_norm=c.clip_norm, lr=c.d_lr,
                            betas=c.betas, grad_sample_mode=c.grad_sample_mode, ema_decay=0.0) as phase:
                bar = tqdm(total=phase.steps // c.d_updates, desc="generator", leave=False,
                           disable=None if ctx.progress else True)
                for step, batch in enumerate(phase.logical_batches(), 1):
                    phase.step(d_loss, batch)
                    if step % c.d_updates == 0:
                        with phase.frozen() as d:
                            bar.set_postfix(loss=f"{generator_step(generator, d, g_optimizer, c.batch_size, draws):.3f}",
                                            refresh=False)
                        bar.update()
                bar.close()
            stage.params = sum(p.numel() for p in generator.parameters())
        return uniform_synthesizer(generator, task, c, self.name)

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> mean_embedding.GeneratorSynthesizer:
        generator = gan_generator(self.config, task, ctx)
        generator.load_state_dict(state["generator"])
        return uniform_synthesizer(generator, task, self.config, self.name)
