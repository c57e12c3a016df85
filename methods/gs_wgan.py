"""GS-WGAN: gradient-sanitized Wasserstein GAN (Chen, Orekondy and Fritz, NeurIPS 2020, arXiv:2006.08265).

The members are split into `discriminators` parts, each member into a part drawn uniformly and
independently of the others, and each part trains a discriminator of its own, non-privately: no
discriminator is ever released. Each generator step draws one discriminator uniformly and takes, for
each of the `batch_size` generated images, the gradient of the generator's WGAN loss with respect to
that image; each such gradient is clipped to `clip_norm`, Gaussian noise is added to all of them,
and the noisy gradients are back-propagated through the generator. Only those noisy gradients
depend on members: the generator, and everything it generates, is post-processing.

Privacy. The paper accounts each generator step as a subsampled Gaussian mechanism with sample
rate 1 / discriminators (the chance that a member's discriminator is drawn) and takes the
sensitivity of one clipped gradient (2 C). privbench keeps the per-step draw and its rate, and
accounts two things differently, both recorded in the ledger as one "selected-gaussian" mechanism
(privbench.dp.ledger; SelectedReleases records it and checks its steps):
  - Sensitivity: adding or removing a member changes its part's discriminator arbitrarily, and with
    it all B clipped gradients of a step, each by at most 2 C: the released [B, pixels] tensor moves
    by at most 2 C sqrt(B).
  - Amplification: when a member's discriminator is not drawn, the step shows another
    discriminator's gradients, which may differ from its own part's by any amount; the Poisson
    amplification the paper's accountant assumes (the member hidden among the others of one batch)
    does not hold. The ledger composes the bound that does (a member takes part with probability q,
    and pays a full Gaussian mechanism when it does).
Both make GS-WGAN's noise larger than the paper's at the same epsilon.

Discriminators train as WGAN-GP critics (Gulrajani et al. 2017) with GS-WGAN's drift term
`drift * D(real)^2`, `critic_iters` steps on their own part before each generator step that draws them.
Samples take uniformly drawn labels: GS-WGAN releases no class counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from privbench.checks import POSITIVE, POSITIVE_INT, Rule, each, integer, number
from privbench.context import RunContext, Task
from privbench.data.transforms import to_model
from privbench.dp import PrivacyLedger, SelectedReleases
from privbench.methods import METHODS, mean_embedding
from privbench.methods.dp_gan import gan_generator, generate, uniform_synthesizer
from privbench.nets.discriminators import ConvDiscriminator

MECHANISM = "generator-gradients"
# Both networks' Adam betas, GS-WGAN's (DPImageBench models/gs_wgan.py at 565f8d7).
ADAM_BETAS = (0.5, 0.9)


@dataclass(frozen=True)
class GSWGANConfig(mean_embedding.GeneratorConfig):
    discriminators: int  # parts of the members, one discriminator each; the per-step rate is 1 / this
    d_channels: tuple[int, ...]
    d_lr: float
    d_batch: int  # real images per critic step, drawn with replacement from the part
    critic_iters: int  # critic steps of the drawn discriminator before each generator step
    warmup_iters: int  # critic steps of every discriminator before the first generator step
    iterations: int  # generator steps: the mechanism's steps
    clip_norm: float  # bound on each generated image's gradient
    gp_weight: float
    drift: float

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "discriminators": POSITIVE_INT, "d_channels": each(POSITIVE_INT), "d_lr": POSITIVE,
                "d_batch": POSITIVE_INT, "critic_iters": POSITIVE_INT, "warmup_iters": integer(0),
                "iterations": POSITIVE_INT, "clip_norm": POSITIVE, "gp_weight": number(0), "drift": number(0)}

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        super().check_resolution(resolution, where)
        mean_embedding.check_discriminator(self.d_channels, resolution, where)


def sensitivity(clip_norm: float, batch_size: int) -> float:
    """L2 sensitivity of a step's B clipped gradients when one discriminator changes arbitrarily."""
    return 2 * clip_norm * math.sqrt(batch_size)


def clip_rows(g: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row (one image's gradient) scaled to L2 norm at most `bound`."""
    norms = g.flatten(1).norm(dim=1).view(-1, *[1] * (g.dim() - 1))
    return g * (bound / (norms + 1e-12)).clamp(max=1.0)


def critic_loss(d: ConvDiscriminator, real: torch.Tensor, labels: torch.Tensor, fake: torch.Tensor,
                gp_weight: float, drift: float, draws: torch.Generator) -> torch.Tensor:
    """WGAN-GP: mean D(fake) - mean D(real) + gp_weight * (||grad D(mix)|| - 1)^2 + drift * D(real)^2."""
    d_real, d_fake = d(real, labels), d(fake, labels)
    t = torch.rand(len(real), 1, 1, 1, generator=draws, device=draws.device).to(real.device)
    mix = (t * real + (1 - t) * fake).requires_grad_(True)
    grad = torch.autograd.grad(d(mix, labels).sum(), mix, create_graph=True)[0]
    penalty = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    return d_fake.mean() - d_real.mean() + gp_weight * penalty + drift * d_real.square().mean()


@METHODS.register("gs-wgan")
class GSWGAN:
    name = "gs-wgan"
    Config = GSWGANConfig
    uses_public = False

    def __init__(self, config: GSWGANConfig):
        self.config = config

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> mean_embedding.GeneratorSynthesizer:
        c, device = self.config, ctx.device
        torch.manual_seed(ctx.stage_seed("gan-init"))
        generator = gan_generator(c, task, ctx)
        critics = [ConvDiscriminator(task.resolution, task.channels, len(task.classes), c.d_channels).to(device)
                   for _ in range(c.discriminators)]
        g_optimizer = torch.optim.Adam(generator.parameters(), lr=c.lr, betas=ADAM_BETAS)
        d_optimizers = [torch.optim.Adam(d.parameters(), lr=c.d_lr, betas=ADAM_BETAS) for d in critics]
        draws = ctx.device_generator("gan-draws")
        images, labels = to_model(task.members.images).to(device), torch.from_numpy(task.members.labels).to(device)
        # Each member's part is its own uniform draw, so adding one member moves no other member.
        part_of = torch.randint(c.discriminators, (len(images),), generator=ctx.mechanism_generator("gs-wgan-parts"))
        parts = [torch.nonzero(part_of == k).flatten() for k in range(c.discriminators)]

        def train_critic(k: int, steps: int) -> None:
            if len(parts[k]) == 0:
                return  # an empty part's critic never sees a member: its gradients carry no data
            for _ in range(steps):
                index = parts[k][torch.randint(len(parts[k]), (c.d_batch,), generator=draws, device=draws.device).cpu()]
                with torch.no_grad():
                    fake, _ = generate(generator, c.d_batch, draws)
                loss = critic_loss(critics[k], images[index], labels[index], fake, c.gp_weight, c.drift, draws)
                d_optimizers[k].zero_grad(set_to_none=True)
                loss.backward()
                d_optimizers[k].step()

        mechanism = ledger.calibrate(MECHANISM, "selected-gaussian", sample_rate=1 / c.discriminators,
                                     steps=c.iterations, sensitivity=sensitivity(c.clip_norm, c.batch_size))
        with ctx.stage("fit") as stage:
            # Recorded before any critic reads a member: a fit that would overspend never starts.
            releases = SelectedReleases(ledger, mechanism, c.discriminators, ctx.mechanism_generator("gs-wgan-releases"))
            for k in tqdm(range(c.discriminators) if c.warmup_iters else (), desc="critic warm-up", leave=False,
                          disable=None if ctx.progress else True):
                train_critic(k, c.warmup_iters)
            for k in tqdm(releases, total=c.iterations, desc="gs-wgan", leave=False, disable=None if ctx.progress else True):
                train_critic(k, c.critic_iters)
                fake, fake_labels = generate(generator, c.batch_size, draws)
                leaf = fake.detach().requires_grad_(True)
                critics[k].requires_grad_(False)
                gradient = torch.autograd.grad(-critics[k](leaf, fake_labels).sum(), leaf)[0]
                critics[k].requires_grad_(True)
                noisy = releases.release(clip_rows(gradient, c.clip_norm))
                g_optimizer.zero_grad(set_to_none=True)
                fake.backward(noisy / c.batch_size)
                g_optimizer.step()
            releases.finish()
            stage.params = sum(p.numel() for p in generator.parameters())
        ctx.log.info("%s: sigma %.4g, q 1/%d, %d steps, sensitivity %.4g", MECHANISM, mechanism.noise_multiplier,
                     c.discriminators, c.iterations, mechanism.sensitivity)
        return uniform_synthesizer(generator, task, c, self.name)

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> mean_embedding.GeneratorSynthesizer:
        generator = gan_generator(self.config, task, ctx)
        generator.load_state_dict(state["generator"])
        return uniform_synthesizer(generator, task, self.config, self.name)
