"""What DP-MERF, DP-Kernel and DP-NTK share: a class-conditional mean embedding of the members in a
feature space with unit-norm features, released with Gaussian noise, and a generator trained to
match the noisy release (a maximum mean discrepancy under the features' kernel).

The three differ in the features (random Fourier features of one Gaussian kernel, of a mixture of
Gaussian kernels, or the tangent features of a random network) and in how often they release: DP-MERF
and DP-NTK once, over all members; DP-Kernel once per generator step, over a Poisson subsample.

Privacy, argued once for all three: each member (x, y) adds the vector [phi(x) (x) onehot(y),
onehot(y)] to the released sum, and ||phi(x)|| = 1, so adding or removing a member moves the sum by a
vector of norm exactly sqrt(2): the L2 sensitivity the ledger calibrates for. Releasing the class
counts in the same vector keeps the member count and the class mix private too. Everything the
generator sees afterwards is computed from the noisy release (post-processing).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from privbench.checks import POSITIVE, POSITIVE_INT, Rule, check_fields, each, number
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.dp import Mechanism, PrivacyLedger, release_gaussian
from privbench.errors import PrivbenchError
from privbench.nets.generators import ConvGenerator

SENSITIVITY = math.sqrt(2.0)
_CHUNK = 512  # members embedded per matrix product: bounds memory at dim x _CHUNK floats


class FeatureMap(Protocol):
    """A feature map phi with ||phi(x)|| = 1 for every image x (flattened, pixels in [0, 1]).

    embed(x [B, pixels], weights [B, C]) -> sum_j phi(x_j) weights_j^T, [dim, C]: with one-hot
    label weights, the class-conditional embedding sum. Differentiable in x: the generator's loss
    back-propagates through it.
    """

    dim: int

    def embed(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


def pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images [B, H, W, C] -> flattened floats in [0, 1], [B, H * W * C]."""
    return torch.from_numpy(images).to(device).flatten(1).float() / 255


def embedding_sum(members: ImageSet, phi: FeatureMap, n_classes: int, device: torch.device) -> torch.Tensor:
    """sum_i [phi(x_i) (x) onehot(y_i), onehot(y_i)] flattened (float64): the statistic released."""
    features = torch.zeros(phi.dim, n_classes, dtype=torch.float64, device=device)
    counts = torch.zeros(n_classes, dtype=torch.float64, device=device)
    for start in range(0, len(members), _CHUNK):
        x = pixels(members.images[start : start + _CHUNK], device)
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(members.labels[start : start + _CHUNK]).to(device), n_classes)
        features += phi.embed(x, one_hot.float()).detach().double()
        counts += one_hot.sum(0).double()
    return torch.cat([features.flatten(), counts])


def read_release(release: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy embedding sum -> the embedding to match (the feature sums [dim, n_classes] over the
    noisy member count, negative counts read as 0) and the noisy class counts [n_classes]."""
    features, counts = release[:-n_classes].view(-1, n_classes), release[-n_classes:]
    return (features / max(float(counts.clamp(min=0).sum()), 1.0)).float(), counts


def release_embedding(
    name: str, members: ImageSet, phi: FeatureMap, n_classes: int, ledger: PrivacyLedger, ctx: RunContext,
    noise_multiplier: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian release of the embedding sum over all members, read as by `read_release`: at the
    fixed `noise_multiplier` where one is given, else at the one that spends what the ledger leaves."""
    mechanism = (ledger.calibrate(name, "gaussian", sensitivity=SENSITIVITY) if noise_multiplier is None
                 else Mechanism(name, "gaussian", noise_multiplier, sensitivity=SENSITIVITY))
    noisy = release_gaussian(ledger, mechanism, embedding_sum(members, phi, n_classes, ctx.device),
                             ctx.mechanism_generator("release"))
    ctx.log.info("released the %d-dimensional %s with noise multiplier %.4g", noisy.numel(), name, mechanism.noise_multiplier)
    return read_release(noisy, n_classes)


def class_proportions(counts: torch.Tensor) -> torch.Tensor:
    """The class mix from noisy counts (negative counts read as 0; uniform if nothing is left)."""
    counts = counts.clamp(min=0)
    return (counts / counts.sum()).float().cpu() if counts.sum() > 0 else torch.full((len(counts),), 1 / len(counts))


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator (privbench.nets.generators.ConvGenerator), its training batch and learning rate,
    and its sampling batch."""

    z_dim: int
    hidden: int
    channels: tuple[int, ...]
    kernel_size: int
    batch_size: int  # generated images per step
    lr: float
    sample_batch_size: int

    def validate(self, where: str = "params.") -> None:
        check_fields(self, where, **self.rules())

    def rules(self) -> dict[str, Rule]:
        """Every field's range; a method's config adds its own fields' to these."""
        return dict(
            z_dim=POSITIVE_INT, hidden=POSITIVE_INT, channels=each(POSITIVE_INT),
            kernel_size=Rule(lambda v: POSITIVE_INT.holds(v) and v % 2 == 1, "an odd positive integer (convolutions keep the size)"),
            batch_size=POSITIVE_INT, lr=POSITIVE, sample_batch_size=POSITIVE_INT,
        )

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        """The generator at the run's resolution: each upsampling block doubles its feature map, which
        starts at resolution / 2^blocks, so that must be a whole number of pixels."""
        blocks = len(self.channels)
        if resolution % 2**blocks:
            raise PrivbenchError(f"setting '{where}channels' gives the generator {blocks} upsampling blocks, which need a "
                                 f"resolution divisible by {2**blocks}, got {resolution} px: e.g. --set {where}channels=16,8")


def check_discriminator(d_channels: tuple[int, ...], resolution: int, where: str = "params.") -> None:
    """A GAN's ConvDiscriminator at the run's resolution: each of its blocks halves the image (rounding
    down), and something must be left after the last."""
    if resolution < 2 ** len(d_channels):
        raise PrivbenchError(f"setting '{where}d_channels' gives the discriminator {len(d_channels)} stride-2 blocks, which "
                             f"leave nothing of a {resolution} px image: e.g. --set {where}d_channels=16,32")


LR_DECAY = number(0, 1, low_open=True)

# target(step) -> (the embedding to match [dim, n_classes], the class proportions to draw labels from)
Target = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def train_generator(
    generator: ConvGenerator,
    phi: FeatureMap,
    target: Target,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch_size: int,
    decay_every: int,
    lr_decay: float,
    draws: torch.Generator,
    desc: str,
    progress: bool,
) -> None:
    """Minimise ||target - (1/B) sum_j phi(G(z_j, y_j)) (x) onehot(y_j)||^2 over the generator.

    Each step draws B labels from the step's class proportions and B latent codes from `draws`; the
    learning rate is multiplied by `lr_decay` every `decay_every` steps.
    """
    n_classes = generator.num_classes
    device = next(generator.parameters()).device
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=lr_decay)
    with tqdm(total=steps, desc=desc, disable=None if progress else True, leave=False) as bar:
        for step in range(steps):
            embedding, proportions = target(step)
            labels = torch.multinomial(proportions, batch_size, replacement=True, generator=draws)
            z = torch.randn(batch_size, generator.z_dim, generator=draws)
            fake = generator(z.to(device), labels.to(device)).flatten(1)
            one_hot = torch.nn.functional.one_hot(labels.to(device), n_classes).float()
            generated = phi.embed(fake, one_hot) / batch_size
            loss = ((embedding - generated) ** 2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            bar.set_postfix(mmd=f"{loss.item():.2e}", refresh=False)
            if (step + 1) % decay_every == 0:
                schedule.step()


class GeneratorSynthesizer:
    """Samples from a trained generator, labels drawn in the privately released class proportions.

    The generator samples with BatchNorm on batch statistics, as it was trained: its running averages
    lag behind a generator that moves fast, and sampling with them cost half the CA (measured for
    DP-MERF at eps = inf on the embedded data: 0.22 with running averages, 0.59 with batch statistics).
    """

    capabilities: frozenset[str] = frozenset()  # none: only the black-box attacks apply

    def __init__(self, generator: ConvGenerator, proportions: torch.Tensor, classes: tuple[str, ...], batch_size: int, name: str):
        self.generator, self.proportions, self.classes = generator.train(), proportions, classes
        self.batch_size, self.name = batch_size, name

    @torch.no_grad()
    def sample(self, n: int, labels: np.ndarray | None = None, generator: torch.Generator | None = None) -> ImageSet:
        if labels is None:
            labels = torch.multinomial(self.proportions, n, replacement=True, generator=generator).numpy()
        device = next(self.generator.parameters()).device
        images = []
        for start in range(0, n, self.batch_size):
            y = torch.as_tensor(labels[start : start + self.batch_size], dtype=torch.int64)
            z = torch.randn(len(y), self.generator.z_dim, generator=generator)
            x = self.generator(z.to(device), y.to(device))
            images.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        return ImageSet(np.concatenate(images), np.asarray(labels, np.int64), self.classes, f"{self.name} samples")

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.generator.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "proportions": self.proportions}


class MeanEmbeddingMethod(abc.ABC):
    """A method of the family: `_fit` releases the members' embedding through the ledger and trains
    the generator on the release with `_train`; fitting is one cost stage, "fit" unless named."""

    name: str
    uses_public = False

    def __init__(self, config: GeneratorConfig):
        self.config = config

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext, stage_name: str = "fit") -> GeneratorSynthesizer:
        with ctx.stage(stage_name) as stage:
            synthesizer = self._fit(task, ledger, ctx)
            stage.params = synthesizer.parameters
        return synthesizer

    @abc.abstractmethod
    def _fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> GeneratorSynthesizer:
        """Release the members' embedding through `ledger`, then train the generator on the release."""

    def _generator(self, task: Task, ctx: RunContext) -> ConvGenerator:
        c = self.config
        return ConvGenerator(c.z_dim, len(task.classes), task.resolution, task.channels, c.hidden, c.channels,
                             c.kernel_size).to(ctx.device)

    def _train(self, task: Task, ctx: RunContext, phi: FeatureMap, target: Target, optimizer: type[torch.optim.Optimizer],
               *, steps: int, decay_every: int, lr_decay: float) -> ConvGenerator:
        """A generator (initialised from the run seed) trained by `train_generator`."""
        torch.manual_seed(ctx.stage_seed("generator-init"))
        generator = self._generator(task, ctx)
        train_generator(generator, phi, target, optimizer(generator.parameters(), lr=self.config.lr), steps=steps,
                        batch_size=self.config.batch_size, decay_every=decay_every, lr_decay=lr_decay,
                        draws=ctx.generator("generator-training"), desc=f"{self.name} generator", progress=ctx.progress)
        return generator

    def _synthesizer(self, generator: ConvGenerator, proportions: torch.Tensor, task: Task) -> GeneratorSynthesizer:
        return GeneratorSynthesizer(generator, proportions, task.classes, self.config.sample_batch_size, self.name)

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> GeneratorSynthesizer:
        generator = self._generator(task, ctx)
        generator.load_state_dict(state["generator"])
        return self._synthesizer(generator, state["proportions"], task)
