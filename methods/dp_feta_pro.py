"""DP-FETA-Pro (Gong, Li, Lin and Wang, "From Easy to Hard++: Promoting Differentially Private Image
Synthesis Through Spatial-Frequency Curriculum", USENIX Security 2026, arXiv 2601.06368): DP-FETA's
curriculum with a second, harder warm-up between the central images and DP-SGD.

Spatial stage: DP-FETA's central images (methods.dp_feta: per-class sums of a Poisson sample of the
pooled members, one subsampled Gaussian mechanism), and pre-training on augmented views of them.

Frequency stage: DP-MERF (methods.dp_merf) on the members average-pooled by `frequency.downsample`.
Their label-conditional sum of random Fourier features, with the class counts,

    E = sum_i [phi(x_i) (x) onehot(y_i), onehot(y_i)],   ||phi(x)|| = 1,   Delta = sqrt(2),

goes out once through one Gaussian mechanism with the fixed noise multiplier `frequency.sigma`
(methods.mean_embedding argues the sensitivity). A generator trained to match the noisy embedding
then draws `frequency.samples` images, every class alike, upsampled (nearest) to the run's side, and
the diffusion model, warmed up on the central images, trains on them (`frequency_pretrain`).
Everything after each release reads only the release (post-processing).

Last, DP-SGD on the members through the shared pipeline, its noise calibrated to what the two
releases leave, so that the three mechanisms compose to the target epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from privbench.checks import POSITIVE, POSITIVE_INT, Rule
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.diffusion.pipeline import CurriculumStage, PretrainConfig
from privbench.dp import PrivacyLedger
from privbench.methods import METHODS
from privbench.methods.dp_feta import DPFETA, DPFETAConfig, check_downsample
from privbench.methods.dp_merf import DPMERF, DPMERFConfig


@dataclass(frozen=True)
class FrequencyConfig(DPMERFConfig):
    sigma: float  # noise multiplier of the embedding release: noise std = sigma * sqrt(2)
    downsample: int  # average-pooling factor of the members before the embedding (and of the generator's side)
    samples: int  # generated images the diffusion model pre-trains on

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "sigma": POSITIVE, "downsample": POSITIVE_INT, "samples": POSITIVE_INT}

    def check_resolution(self, resolution: int, where: str = "params.frequency.") -> None:
        check_downsample(self.downsample, resolution, where)
        super().check_resolution(resolution // self.downsample, where)


@dataclass(frozen=True)
class DPFETAProConfig(DPFETAConfig):
    frequency: FrequencyConfig
    frequency_pretrain: PretrainConfig

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        super().check_resolution(resolution, where)
        self.frequency.check_resolution(resolution, f"{where}frequency.")


def pooled(images: ImageSet, factor: int) -> ImageSet:
    """`images` average-pooled by `factor`, as uint8: each image from its own pixels only."""
    x = torch.from_numpy(images.images).permute(0, 3, 1, 2).float()
    small = F.avg_pool2d(x, factor).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return ImageSet(small, images.labels, images.classes, f"{images.name}, pooled by {factor}")


def frequency_images(task: Task, ledger: PrivacyLedger, config: FrequencyConfig, ctx: RunContext) -> ImageSet:
    """DP-MERF's release of the pooled members (recorded in `ledger`) and `config.samples` images of
    the generator trained on it, upsampled to the run's side."""
    members = pooled(task.members, config.downsample)
    generator = DPMERF(config, config.sigma).fit(Task(members, None, task.classes), ledger, ctx, "frequency-generator")
    labels = np.arange(config.samples) % len(task.classes)  # every class alike, as DPImageBench generates them
    drawn = generator.sample(config.samples, labels, ctx.generator("frequency-samples"))
    images = drawn.images.repeat(config.downsample, axis=1).repeat(config.downsample, axis=2)
    return ImageSet(images, drawn.labels, task.classes, "DP-FETA-Pro frequency-stage images")


@METHODS.register("dp-feta-pro")
class DPFETAPro(DPFETA):
    """Central-image release and pre-training on it (DP-FETA), a DP-MERF release and pre-training
    on its generator's images, DP-SGD fine-tuning, conditional sampling."""

    name = "dp-feta-pro"
    Config = DPFETAProConfig
    preset_files = ("diffusion", "dp_feta_pro")

    def curriculum(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> list[CurriculumStage]:
        spatial = super().curriculum(task, ledger, ctx)
        c = self.config
        frequency = frequency_images(task, ledger, c.frequency, ctx)
        ctx.log.info("pre-training on %d frequency-stage images after the central images", len(frequency))
        return [*spatial, CurriculumStage(frequency, True, c.frequency_pretrain, "pretrain-frequency")]
