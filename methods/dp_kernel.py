"""DP-Kernel: generative modelling under functional Renyi differential privacy (Jiang, Sun and Yu,
NeurIPS 2023).

The kernel mean embedding of the members, under a mixture of Gaussian kernels of several bandwidths,
is released with Gaussian-process noise once per generator step from a Poisson subsample of the
members, and the generator steps towards each noisy release; the releases compose as a subsampled
Gaussian mechanism over the steps (the paper's functional RDP of the GP mechanism with subsampling).

privbench draws the GP noise in the random-feature space of the same kernel: features from D/(2K)
frequencies per bandwidth (K bandwidths), so the kernel is the mixture's average and ||phi(x)|| = 1.
A Gaussian vector on those features is a Gaussian process with that (approximated) kernel, the
release is a Gaussian mechanism on a finite vector with the sensitivity of methods.mean_embedding,
and the generator's gradient is the gradient of the noisy embedding itself. (DPImageBench's
models/dp_kernel.py adds the GP sample to the loss's value only, so its gradient direction comes
from the noiseless embedding; it also skips the noise when the covariance is not positive definite.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privbench.checks import POSITIVE, POSITIVE_INT, Rule, each, one_of
from privbench.context import RunContext, Task
from privbench.dp import PrivacyLedger, SubsampledReleases
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.methods import mean_embedding
from privbench.methods.dp_merf import EVEN, RandomFourierFeatures

OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}


@dataclass(frozen=True)
class DPKernelConfig(mean_embedding.GeneratorConfig):
    bandwidths: tuple[float, ...]  # Gaussian kernels exp(-||x - x'||^2 / (2 s^2)), pixels in [0, 1]
    d_rff: int  # random features in all, split evenly over the bandwidths
    steps: int  # generator steps, one private release each
    member_batch: int  # expected members per release: sample rate q = member_batch / members
    optimizer: str

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "bandwidths": each(POSITIVE), "d_rff": EVEN, "steps": POSITIVE_INT,
                "member_batch": POSITIVE_INT, "optimizer": one_of(OPTIMIZERS, "optimizer")}

    def validate(self, where: str = "params.") -> None:
        super().validate(where)
        if self.d_rff % (2 * len(self.bandwidths)):
            raise PrivbenchError(f"setting '{where}d_rff' must be a multiple of {2 * len(self.bandwidths)} (a cosine and a "
                                 f"sine per frequency for each of {len(self.bandwidths)} bandwidths), got {self.d_rff}")


def mixture_frequencies(bandwidths: tuple[float, ...], d_rff: int, n_pixels: int, generator: torch.Generator) -> torch.Tensor:
    """D/(2K) frequencies W ~ N(0, I / s^2) per bandwidth s: random features of the average of the K
    Gaussian kernels. They do not depend on the data: drawing them costs no privacy."""
    per_kernel = d_rff // (2 * len(bandwidths))
    return torch.cat([torch.randn(per_kernel, n_pixels, generator=generator) / s for s in bandwidths])


@METHODS.register("dp-kernel")
class DPKernel(mean_embedding.MeanEmbeddingMethod):
    name = "dp-kernel"
    Config = DPKernelConfig

    def _fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> mean_embedding.GeneratorSynthesizer:
        c, members, n_classes = self.config, task.members, len(task.classes)
        if c.member_batch > len(members):
            raise PrivbenchError(f"setting 'params.member_batch' = {c.member_batch} exceeds the {len(members)} members: "
                                 f"e.g. --set params.member_batch={len(members) // 4}")
        n_pixels = task.resolution**2 * task.channels
        phi = RandomFourierFeatures(mixture_frequencies(c.bandwidths, c.d_rff, n_pixels, ctx.generator("rff")).to(ctx.device))
        mechanism = ledger.calibrate("kernel-embedding", "gaussian", sample_rate=c.member_batch / len(members),
                                     steps=c.steps, sensitivity=mean_embedding.SENSITIVITY)
        ctx.log.info("releasing the kernel embedding %d times at sample rate %.4g with noise multiplier %.4g",
                     c.steps, mechanism.sample_rate, mechanism.noise_multiplier)
        releases = SubsampledReleases(ledger, mechanism, len(members), ctx.mechanism_generator("release"))
        samples = iter(releases)
        count_total = torch.zeros(n_classes, dtype=torch.float64)

        def target(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            noisy = releases.release(mean_embedding.embedding_sum(members.subset(next(samples).numpy()), phi, n_classes, ctx.device))
            embedding, counts = mean_embedding.read_release(noisy, n_classes)
            count_total.add_(counts.cpu())
            return embedding, mean_embedding.class_proportions(count_total)

        generator = self._train(task, ctx, phi, target, OPTIMIZERS[c.optimizer], steps=c.steps, decay_every=c.steps, lr_decay=1.0)
        releases.finish()
        return self._synthesizer(generator, mean_embedding.class_proportions(count_total), task)
