"""DP-MERF: differentially private mean embeddings with random features (Harder, Adamczewski and
Park, AISTATS 2021).

The members are summarised once by a label-conditional mean embedding of random Fourier features
of a Gaussian kernel, released with Gaussian noise; a generator is then trained, without touching
the members again, to match the noisy embedding (methods.mean_embedding, which also argues the
sensitivity). The original divides by the member count as if it were public, with sensitivity 2/n
under replacement; here the counts are released in the same vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from privbench.checks import POSITIVE, POSITIVE_INT, Rule
from privbench.context import RunContext, Task
from privbench.dp import PrivacyLedger
from privbench.methods import METHODS
from privbench.methods import mean_embedding

EVEN = Rule(lambda v: POSITIVE_INT.holds(v) and v % 2 == 0, "an even positive integer (a cosine and a sine per frequency)")


@dataclass(frozen=True)
class DPMERFConfig(mean_embedding.GeneratorConfig):
    d_rff: int  # random features D: D/2 frequencies, each giving a cosine and a sine
    rff_sigma: float  # frequencies W ~ N(0, I / rff_sigma) over pixels scaled to [0, 1]
    epochs: int  # passes of batch_size generated images per (noisy) member count
    lr_decay: float  # multiplies the learning rate after every epoch

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "d_rff": EVEN, "rff_sigma": POSITIVE, "epochs": POSITIVE_INT,
                "lr_decay": mean_embedding.LR_DECAY}


def random_features(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """phi(x) = [cos(W x), sin(W x)] / sqrt(D/2) for flattened images x in [0, 1]; ||phi(x)|| = 1."""
    projection = x @ frequencies.T
    return torch.cat([projection.cos(), projection.sin()], dim=1) / math.sqrt(frequencies.shape[0])


class RandomFourierFeatures:
    """The feature map of random_features for fixed frequencies [D/2, pixels]."""

    def __init__(self, frequencies: torch.Tensor):
        self.frequencies, self.dim = frequencies, 2 * frequencies.shape[0]

    def embed(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return random_features(x, self.frequencies).T @ weights


def draw_frequencies(d_rff: int, rff_sigma: float, n_pixels: int, generator: torch.Generator) -> torch.Tensor:
    """D/2 frequencies W ~ N(0, I / rff_sigma): random features of exp(-||x - x'||^2 / (2 rff_sigma)).
    They do not depend on the data: drawing them costs no privacy."""
    return torch.randn(d_rff // 2, n_pixels, generator=generator) / math.sqrt(rff_sigma)


@METHODS.register("dp-merf")
class DPMERF(mean_embedding.MeanEmbeddingMethod):
    name = "dp-merf"
    Config = DPMERFConfig

    def __init__(self, config: DPMERFConfig, noise_multiplier: float | None = None):
        """`noise_multiplier`: the release's, fixed (FETA-Pro's frequency stage); None spends what the
        ledger leaves (DP-MERF alone)."""
        super().__init__(config)
        self.noise_multiplier = noise_multiplier

    def _fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> mean_embedding.GeneratorSynthesizer:
        c, n_classes = self.config, len(task.classes)
        n_pixels = task.resolution**2 * task.channels
        phi = RandomFourierFeatures(draw_frequencies(c.d_rff, c.rff_sigma, n_pixels, ctx.generator("rff")).to(ctx.device))
        target, counts = mean_embedding.release_embedding("mean-embedding", task.members, phi, n_classes, ledger, ctx,
                                                         self.noise_multiplier)
        proportions = mean_embedding.class_proportions(counts)
        steps_per_epoch = math.ceil(max(float(counts.clamp(min=0).sum()), 1.0) / c.batch_size)
        generator = self._train(task, ctx, phi, lambda step: (target, proportions), torch.optim.Adam,
                                steps=c.epochs * steps_per_epoch, decay_every=steps_per_epoch, lr_decay=c.lr_decay)
        return self._synthesizer(generator, proportions, task)
