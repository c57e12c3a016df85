"""DP-FETA (Li, Gong et al., "From Easy to Hard: Building a Shortcut for Differentially Private Image
Synthesis", IEEE S&P 2025, arXiv 2504.01395): a warm-up on privately released central images, then
DP-SGD on the members.

The easy stage: `releases` times, a Poisson sample of the members (expected size `batch_size`) gives,
per class c, the sum S_c of its members' images, each average-pooled by `downsample` with pixels in
[0, 1]. Adding or removing one member moves one S_c by its pooled image, of L2 norm at most
sqrt(channels * (resolution / downsample)^2): the sensitivity of the whole release (all classes).
The noisy sums go out through one subsampled Gaussian mechanism (sigma, q = batch_size / members,
steps = releases), and each is divided by the public expected class count m = batch_size / classes:

    central_c = (S_c + N(0, sigma^2 Delta^2 I)) / m,    Delta = sqrt(channels) * resolution / downsample

Everything after the release is post-processing, as DPImageBench's data/dataset_loader.py
(CentralDataset.query_mean_image, 565f8d7) does it: clamp to [0, 1], bilinear upsampling to the run's
side, a 3x3 median filter, and on grey images a 3x3 sharpening. The diffusion model is pre-trained,
conditioned on the class, on `augment_copies` RandAugment views (2 operations at magnitude 9) of every
central image, then fine-tuned with DP-SGD through the shared pipeline, whose noise is calibrated to
what the release leaves of the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from privbench.checks import POSITIVE, POSITIVE_INT, check_fields
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.diffusion.pipeline import DiffusionMethod, PretrainedDiffusionConfig
from privbench.dp import Mechanism, PrivacyLedger, SubsampledReleases
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.store import write_npz

SHARPEN = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]])  # DPImageBench's kernel for grey images


@dataclass(frozen=True)
class CentralConfig:
    batch_size: int  # expected members per release: sample rate q = batch_size / members
    sigma: float  # noise multiplier: noise std = sigma * sensitivity (the module docstring's Delta)
    releases: int  # Poisson samples released, each giving one central image per class
    downsample: int  # average-pooling factor before the release: a smaller image has a smaller sensitivity
    augment_copies: int  # RandAugment views of each central image that pre-training draws from

    def validate(self, where: str = "params.central.") -> None:
        check_fields(self, where, batch_size=POSITIVE_INT, sigma=POSITIVE, releases=POSITIVE_INT, downsample=POSITIVE_INT,
                     augment_copies=POSITIVE_INT)

    def check_resolution(self, resolution: int, where: str = "params.central.") -> None:
        check_downsample(self.downsample, resolution, where)


def check_downsample(downsample: int, resolution: int, where: str) -> None:
    """Refuse a pooling factor `{where}downsample` that does not divide the run's side."""
    if resolution % downsample:
        fits = max(f for f in range(1, downsample) if resolution % f == 0)
        raise PrivbenchError(f"setting '{where}downsample' = {downsample} does not divide the {resolution} px side: "
                             f"use a divisor of it, e.g. --set {where}downsample={fits}")


@dataclass(frozen=True)
class DPFETAConfig(PretrainedDiffusionConfig):
    central: CentralConfig

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        super().check_resolution(resolution, where)
        self.central.check_resolution(resolution, f"{where}central.")


def sensitivity(channels: int, resolution: int, downsample: int) -> float:
    """The L2 norm bound of one member's pooled image, pixels in [0, 1]: the release's sensitivity."""
    return math.sqrt(channels) * resolution / downsample


def class_sums(members: ImageSet, n_classes: int, downsample: int) -> torch.Tensor:
    """[classes, C, side, side] float64: S_c, the sum of the pooled images of class c's members."""
    x = torch.from_numpy(members.images).permute(0, 3, 1, 2).double() / 255
    pooled = F.avg_pool2d(x, downsample)
    sums = torch.zeros(n_classes, *pooled.shape[1:], dtype=torch.float64)
    return sums.index_add_(0, torch.from_numpy(members.labels), pooled)


def release_central_means(task: Task, ledger: PrivacyLedger, config: CentralConfig, ctx: RunContext) -> torch.Tensor:
    """[releases * classes, C, side, side]: the noisy class means of every release, class-major
    within a release, from one subsampled Gaussian mechanism recorded in `ledger`."""
    members, n_classes = task.members, len(task.classes)
    if config.batch_size > len(members):
        raise PrivbenchError(f"setting 'params.central.batch_size' = {config.batch_size} exceeds the {len(members)} members: "
                             f"e.g. --set params.central.batch_size={len(members) // 2}")
    mechanism = Mechanism("central-images", "gaussian", config.sigma, sample_rate=config.batch_size / len(members),
                          steps=config.releases, sensitivity=sensitivity(task.channels, task.resolution, config.downsample))
    releases = SubsampledReleases(ledger, mechanism, len(members), ctx.mechanism_generator("central-images"))
    expected_class_count = config.batch_size / n_classes  # public: a setting, never the sample's own count
    means = [releases.release(class_sums(members.subset(index.numpy()), n_classes, config.downsample)) / expected_class_count
             for index in releases]
    releases.finish()
    return torch.cat(means)


def post_process(means: torch.Tensor, resolution: int) -> np.ndarray:
    """Noisy means -> uint8 NHWC central images at the run's side (no member is read)."""
    x = F.interpolate(means.float().clamp(0, 1), size=(resolution, resolution), mode="bilinear", align_corners=False)
    windows = F.pad(x, (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1)
    x = windows.flatten(-2).median(-1).values
    if x.shape[1] == 1:
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), SHARPEN.view(1, 1, 3, 3)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def augmented(central: ImageSet, copies: int, seed: int) -> ImageSet:
    """`copies` RandAugment views of every central image (DPImageBench draws a fresh view per batch;
    a fixed pool of views keeps pre-training a plain draw from a tensor, cacheable by its content)."""
    augment = v2.RandAugment(num_ops=2, magnitude=9)
    images = torch.from_numpy(central.images).permute(0, 3, 1, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = torch.stack([augment(image) for _ in range(copies) for image in images])
    labels = np.tile(central.labels, copies)
    return ImageSet(views.permute(0, 2, 3, 1).contiguous().numpy(), labels, central.classes, f"{central.name}, augmented")


@METHODS.register("dp-feta")
class DPFETA(DiffusionMethod):
    """Central-image release (one subsampled Gaussian mechanism), conditional pre-training on
    augmented views of the central images, DP-SGD fine-tuning, conditional sampling."""

    name = "dp-feta"
    Config = DPFETAConfig
    uses_public = False
    preset_files = ("diffusion", "dp_feta")

    def pretraining_set(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> tuple[ImageSet, bool]:
        c = self.config.central
        with ctx.stage("central-images"):
            means = release_central_means(task, ledger, c, ctx)
        # From here on only the noisy means are used (post-processing).
        labels = np.tile(np.arange(len(task.classes), dtype=np.int64), c.releases)
        central = ImageSet(post_process(means, task.resolution), labels, task.classes, "DP-FETA central images")
        write_npz(ctx.run_dir / "central_images.npz", images=central.images, labels=central.labels)
        ctx.log.info("released %d central images (%d per class) with noise multiplier %g at sample rate %.4g",
                     len(central), c.releases, c.sigma, c.batch_size / len(task.members))
        return augmented(central, c.augment_copies, ctx.stage_seed("central-augment")), True
