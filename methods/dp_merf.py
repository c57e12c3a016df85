"""DP-MERF: differentially private mean embeddings with random features (Harder, Adamczewski and
Park, AISTATS 2021).

The members are summarised once by a label-conditional mean embedding of random Fourier features,
released with Gaussian noise; a generator is then trained, without touching the members again, to
match the noisy embedding (a maximum mean discrepancy under the approximated Gaussian kernel).

Privacy: each member (x, y) adds the vector [phi(x) (x) onehot(y), onehot(y)] to one sum, where
phi(x) = [cos(Wx), sin(Wx)] / sqrt(D/2) has norm exactly 1. Adding or removing a member moves the
sum by a vector of norm sqrt(2), the L2 sensitivity the ledger calibrates for. Releasing the class
counts in the same vector keeps the member count and class mix private too (the original divides by
the member count as if it were public, with sensitivity 2/n under replacement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from privbench.checks import POSITIVE, POSITIVE_INT, Rule, check_fields, each, number
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.dp import PrivacyLedger, release_gaussian
from privbench.methods import METHODS
from privbench.nets.generators import ConvGenerator

SENSITIVITY = math.sqrt(2.0)
_CHUNK = 512  # members embedded per matrix product: bounds memory at d_rff x _CHUNK floats


@dataclass(frozen=True)
class DPMERFConfig:
    d_rff: int  # random features D: D/2 frequencies, each giving a cosine and a sine
    rff_sigma: float  # frequencies W ~ N(0, I / rff_sigma) over pixels scaled to [0, 1]
    z_dim: int
    hidden: int
    channels: tuple[int, ...]
    kernel_size: int
    epochs: int  # passes of batch_size generated images per (noisy) member count
    batch_size: int
    lr: float
    lr_decay: float  # multiplies the learning rate after every epoch
    sample_batch_size: int

    def validate(self, where: str = "params.") -> None:
        check_fields(
            self, where,
            d_rff=Rule(lambda v: POSITIVE_INT.holds(v) and v % 2 == 0, "an even positive integer (a cosine and a sine per frequency)"),
            rff_sigma=POSITIVE, z_dim=POSITIVE_INT, hidden=POSITIVE_INT, channels=each(POSITIVE_INT),
            kernel_size=Rule(lambda v: POSITIVE_INT.holds(v) and v % 2 == 1, "an odd positive integer (convolutions keep the size)"),
            epochs=POSITIVE_INT, batch_size=POSITIVE_INT, lr=POSITIVE, lr_decay=number(0, 1, low_open=True),
            sample_batch_size=POSITIVE_INT,
        )


def random_features(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """phi(x) = [cos(W x), sin(W x)] / sqrt(D/2) for flattened images x in [0, 1]; ||phi(x)|| = 1."""
    projection = x @ frequencies.T
    return torch.cat([projection.cos(), projection.sin()], dim=1) / math.sqrt(frequencies.shape[0])


def embedding_sum(members: ImageSet, frequencies: torch.Tensor, n_classes: int) -> torch.Tensor:
    """sum_i [phi(x_i) (x) onehot(y_i), onehot(y_i)] flattened: the one statistic DP-MERF releases."""
    device = frequencies.device
    features = torch.zeros(frequencies.shape[0] * 2, n_classes, dtype=torch.float64, device=device)
    counts = torch.zeros(n_classes, dtype=torch.float64, device=device)
    for start in range(0, len(members), _CHUNK):
        x = torch.from_numpy(members.images[start : start + _CHUNK]).to(device).flatten(1).float() / 255
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(members.labels[start : start + _CHUNK]).to(device), n_classes)
        features += (random_features(x, frequencies).T @ one_hot.float()).double()
        counts += one_hot.sum(0).double()
    return torch.cat([features.flatten(), counts])


class DPMERFSynthesizer:
    """Samples from the trained generator, labels drawn in the privately released class proportions.

    The generator samples with BatchNorm on batch statistics, as it was trained: its running averages
    lag behind a generator that moves fast, and sampling with them cost half the CA (measured at
    eps = inf on the embedded data: 0.22 with running averages, 0.59 with batch statistics).
    """

    def __init__(self, generator: ConvGenerator, proportions: torch.Tensor, classes: tuple[str, ...], config: DPMERFConfig):
        self.generator, self.proportions, self.classes, self.config = generator.train(), proportions, classes, config

    @torch.no_grad()
    def sample(self, n: int, labels: np.ndarray | None = None, generator: torch.Generator | None = None) -> ImageSet:
        if labels is None:
            labels = torch.multinomial(self.proportions, n, replacement=True, generator=generator).numpy()
        device = next(self.generator.parameters()).device
        images = []
        for start in range(0, n, self.config.sample_batch_size):
            y = torch.as_tensor(labels[start : start + self.config.sample_batch_size], dtype=torch.int64)
            z = torch.randn(len(y), self.config.z_dim, generator=generator)
            x = self.generator(z.to(device), y.to(device))
            images.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        return ImageSet(np.concatenate(images), np.asarray(labels, np.int64), self.classes, "dp-merf samples")

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.generator.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "proportions": self.proportions}


@METHODS.register("dp-merf")
class DPMERF:
    name = "dp-merf"
    Config = DPMERFConfig
    uses_public = False

    def __init__(self, config: DPMERFConfig):
        self.config = config

    def _generator(self, task: Task, ctx: RunContext) -> ConvGenerator:
        c = self.config
        return ConvGenerator(
            c.z_dim, len(task.classes), task.resolution, task.channels, c.hidden, c.channels, c.kernel_size
        ).to(ctx.device)

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> DPMERFSynthesizer:
        with ctx.stage("fit") as stage:
            synthesizer = self._fit(task, ledger, ctx)
            stage.params = synthesizer.parameters
        return synthesizer

    def _fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> DPMERFSynthesizer:
        c, n_classes = self.config, len(task.classes)
        n_pixels = task.resolution**2 * task.channels
        # The frequencies do not depend on the data: drawing them costs no privacy.
        frequencies = torch.randn(c.d_rff // 2, n_pixels, generator=ctx.generator("rff")) / math.sqrt(c.rff_sigma)
        frequencies = frequencies.to(ctx.device)
        mechanism = ledger.calibrate("mean-embedding", "gaussian", sensitivity=SENSITIVITY)
        noisy = release_gaussian(
            ledger, mechanism, embedding_sum(task.members, frequencies, n_classes), ctx.mechanism_generator("release")
        )
        ctx.log.info("released the mean embedding with noise multiplier %.4g", mechanism.noise_multiplier)
        # From here on only the noisy release is used (post-processing).
        counts = noisy[-n_classes:].clamp(min=0)
        n_noisy = max(float(counts.sum()), 1.0)
        proportions = (counts / counts.sum()).float().cpu() if counts.sum() > 0 else torch.full((n_classes,), 1 / n_classes)
        target = (noisy[:-n_classes].view(-1, n_classes) / n_noisy).float()

        torch.manual_seed(ctx.stage_seed("generator-init"))
        generator = self._generator(task, ctx)
        optimizer = torch.optim.Adam(generator.parameters(), lr=c.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=c.lr_decay)
        draws = ctx.generator("generator-training")
        steps_per_epoch = math.ceil(n_noisy / c.batch_size)
        with tqdm(total=c.epochs * steps_per_epoch, desc="dp-merf generator", disable=None if ctx.progress else True, leave=False) as bar:
            for _ in range(c.epochs):
                for _ in range(steps_per_epoch):
                    labels = torch.multinomial(proportions, c.batch_size, replacement=True, generator=draws)
                    z = torch.randn(c.batch_size, c.z_dim, generator=draws)
                    fake = generator(z.to(ctx.device), labels.to(ctx.device)).flatten(1)
                    one_hot = torch.nn.functional.one_hot(labels.to(ctx.device), n_classes).float()
                    generated = random_features(fake, frequencies).T @ one_hot / c.batch_size
                    loss = ((target - generated) ** 2).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    bar.update()
                    bar.set_postfix(mmd=f"{loss.item():.2e}", refresh=False)
                schedule.step()
        return DPMERFSynthesizer(generator, proportions, task.classes, c)

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> DPMERFSynthesizer:
        generator = self._generator(task, ctx)
        generator.load_state_dict(state["generator"])
        return DPMERFSynthesizer(generator, state["proportions"], task.classes, self.config)
