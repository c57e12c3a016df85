"""Private Evolution, PE (Lin, Gopi, Kulkarni, Nori, Yekhanin, "Differentially Private Synthetic Data via
Foundation Model APIs 1: Images", ICLR 2024), run per class as DPImageBench runs it.

Nothing is trained on the members. A public diffusion model (the pipeline's unconditional pre-training
on the public set, shared with PDP-Diffusion through its cache) offers two APIs: random samples
(EDM's sampler) and variations of an image (`edm_variation`: noise it to one of the sampler's levels
and denoise from there). Each sensitive class keeps a population of `population` synthetic images,
drawn at first from the random API. Each of T iterations (one per entry of `variation_degrees`):

  1. lookahead: embed `lookahead` variations of every candidate and average them (Lin et al., Sec. 4,
     "lookahead"); with 0, embed the candidate itself;
  2. the vote: every member of class c votes for the candidate of class c whose embedding is nearest
     its own (L2), giving the histogram H_t over all classes' candidates;
  3. release H_t + N(0, sigma^2 I) (the ledger's noise), subtract `threshold` from every count and
     floor it at 0 (Alg. 1's threshold H);
  4. draw the next population of each class from its candidates in proportion to those counts, and
     replace each by one variation at the iteration's degree.
The synthetic set is the final population.

Privacy: adding or removing one member adds or removes one vote, in its own class's histogram, so
H_t (all classes' histograms as one vector) moves by a vector of L2 norm exactly 1 whatever the
lookahead (it changes what candidates look like, never how many votes a member casts). The T releases
are one Gaussian mechanism with q = 1 and T steps (RepeatedReleases), calibrated to what the ledger has
left: its T-fold composition is the Gaussian mechanism with multiplier sigma / sqrt(T), the accounting
DPImageBench's models/pe.py uses (get_noise_multiplier with num_steps = T). Everything after a release
(thresholds, resampling, variations) is post-processing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from privbench.checks import POSITIVE_INT, check_fields, each, integer, number, one_of
from privbench.compute import autocast
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.data.transforms import to_uint8
from privbench.diffusion.edm import edm_sampler, edm_variation, unconditional_label
from privbench.diffusion.pipeline import EDM, PretrainConfig, UNetConfig, build_model, pretrain
from privbench.dp import PrivacyLedger, RepeatedReleases
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.metrics.inception import inception_features

# One member casts one vote, in one class's histogram: the L2 sensitivity of H_t.
SENSITIVITY = 1.0
_CHUNK = 1024  # members whose distances to the candidates are computed at once


def pixel_features(images: np.ndarray, device: torch.device, progress: bool) -> torch.Tensor:
    """The pixels themselves in [0, 1], flattened: a fixed map that learns nothing."""
    return torch.from_numpy(images).to(device).flatten(1).float() / 255


def inception_pool_features(images: np.ndarray, device: torch.device, progress: bool) -> torch.Tensor:
    """The FID Inception-v3's pool features (privbench.metrics.inception), as DPImageBench's PE embeds
    (model.feature_extractor inception_v3)."""
    return torch.from_numpy(inception_features(images, device, progress=progress)).float().to(device)


EMBEDDINGS: dict[str, Callable[[np.ndarray, torch.device, bool], torch.Tensor]] = {
    "pixels": pixel_features, "inception": inception_pool_features,
}


@dataclass(frozen=True)
class PEConfig:
    unet: UNetConfig  # the public model behind both APIs, pre-trained as PDP-Diffusion's
    pretrain: PretrainConfig
    population: int  # synthetic candidates per sensitive class
    variation_degrees: tuple[int, ...]  # iteration t's variation starts at sampler level [t]; T = their count
    sampler_steps: int  # noise levels of EDM's sampler: the random API runs them all
    lookahead: int  # variations averaged per candidate before the vote; 0: the candidate itself
    threshold: float  # subtracted from every noisy count, which is then floored at 0
    embedding: str  # the vote's feature space (EMBEDDINGS)
    batch_size: int  # images per network call

    def validate(self, where: str = "params.") -> None:
        check_fields(self, where, population=POSITIVE_INT, variation_degrees=each(integer(0)),
                     sampler_steps=integer(2), lookahead=integer(0), threshold=number(0),
                     embedding=one_of(tuple(EMBEDDINGS), "embeddings"), batch_size=POSITIVE_INT)
        if max(self.variation_degrees) >= self.sampler_steps:
            raise PrivbenchError(f"setting '{where}variation_degrees' must index the sampler's {self.sampler_steps} noise "
                                 f"levels (0 to {self.sampler_steps - 1}), got {list(self.variation_degrees)}: "
                                 f"lower them or raise '{where}sampler_steps'")

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        self.unet.check_resolution(resolution, f"{where}unet.")


def vote_histogram(member_features: torch.Tensor, member_labels: torch.Tensor, candidate_features: torch.Tensor) -> torch.Tensor:
    """H: every member's vote for the nearest (L2) candidate of its own class. `candidate_features` is
    [classes, population, d]; the result, [classes * population] (float64), counts the votes of class c's
    members for class c's candidates in rows c * population to (c + 1) * population."""
    n_classes, population, _ = candidate_features.shape
    histogram = torch.zeros(n_classes, population, dtype=torch.float64, device=candidate_features.device)
    for c in range(n_classes):
        voters = member_features[member_labels == c]
        for start in range(0, len(voters), _CHUNK):
            nearest = torch.cdist(voters[start : start + _CHUNK], candidate_features[c]).argmin(dim=1)
            histogram[c] += torch.bincount(nearest, minlength=population).double()
    return histogram.flatten()


def selection_weights(noisy: torch.Tensor, threshold: float) -> torch.Tensor:
    """max(count - threshold, 0) per candidate, [classes, population] from a released histogram."""
    return noisy.clamp(min=threshold) - threshold


def resample(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each class's next population: `population` indices drawn with replacement in proportion to its
    weights ([classes, population]); a class whose every weight is 0 carries no signal, and draws uniformly."""
    uniform = torch.ones_like(weights)
    usable = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, uniform)
    return torch.multinomial(usable.cpu(), weights.shape[1], replacement=True, generator=generator)


class PESynthesizer:
    """The final population: samples are drawn from each class's candidates, without replacement until
    they run out; labels default to a uniform class mix (DPImageBench's PE outputs equal classes)."""

    capabilities: frozenset[str] = frozenset()  # a set of images: only the black-box attacks apply

    def __init__(self, population: np.ndarray, classes: tuple[str, ...]):
        self.population, self.classes = population, classes  # uint8 [classes, population, H, W, C]

    def sample(self, n: int, labels: np.ndarray | None = None, generator: torch.Generator | None = None) -> ImageSet:
        n_classes, size = self.population.shape[:2]
        if labels is None:
            labels = torch.multinomial(torch.ones(n_classes), n, replacement=True, generator=generator).numpy()
        labels = np.asarray(labels, np.int64)
        images = np.empty((len(labels), *self.population.shape[2:]), np.uint8)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            order = torch.cat([torch.randperm(size, generator=generator) for _ in range(math.ceil(len(rows) / size))])
            images[rows] = self.population[c][order[: len(rows)].numpy()]
        return ImageSet(images, labels, self.classes, "pe samples")

    @property
    def parameters(self) -> int:
        """What the synthesizer stores: the population's pixel values."""
        return int(self.population.size)

    def state_dict(self) -> dict[str, Any]:
        return {"population": torch.from_numpy(self.population)}


@METHODS.register("pe")
class PE:
    name = "pe"
    Config = PEConfig
    uses_public = True

    def __init__(self, config: PEConfig):
        self.config = config

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> PESynthesizer:
        c = self.config
        mechanism = ledger.calibrate("pe-votes", "gaussian", steps=len(c.variation_degrees), sensitivity=SENSITIVITY)
        releases = RepeatedReleases(ledger, mechanism, ctx.mechanism_generator("pe-votes"))
        ctx.log.info("PE: %d votes, noise multiplier %.4g", mechanism.steps, mechanism.noise_multiplier)
        model = build_model(c.unet, task, ctx)
        pretrain(model, task.public, False, c.pretrain, ctx)
        apis = _APIs(model.eval(), c, task, ctx)
        n_classes = len(task.classes)
        with ctx.stage("fit") as stage:
            embed = EMBEDDINGS[c.embedding]
            members = embed(task.members.images, ctx.device, ctx.progress)
            member_labels = torch.from_numpy(task.members.labels).to(ctx.device)
            population = apis.random(n_classes * c.population).view(n_classes, c.population, *apis.shape)
            picks = ctx.generator("pe-resample")
            for t in releases:
                started, degree = time.perf_counter(), c.variation_degrees[t]
                candidates = apis.lookahead_features(population.flatten(0, 1), degree, embed)
                histogram = vote_histogram(members, member_labels, candidates.view(n_classes, c.population, -1))
                noisy = releases.release(histogram).view(n_classes, c.population)
                chosen = resample(selection_weights(noisy, c.threshold), picks)
                survivors = population[torch.arange(n_classes)[:, None], chosen]
                population = apis.vary(survivors.flatten(0, 1), degree).view_as(population)
                ctx.log.info("PE iteration %d/%d (degree %d): %d distinct candidates survived, %.1f s", t + 1,
                             mechanism.steps, degree, sum(len(set(row.tolist())) for row in chosen),
                             time.perf_counter() - started)
            releases.finish()
            stage.params = model
        return PESynthesizer(to_uint8(population.flatten(0, 1)).reshape(n_classes, c.population, task.resolution,
                                                                         task.resolution, task.channels), task.classes)

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> PESynthesizer:
        return PESynthesizer(state["population"].numpy(), task.classes)


class _APIs:
    """The random and variation APIs of one public model, in batches, unconditional."""

    def __init__(self, model: torch.nn.Module, config: PEConfig, task: Task, ctx: RunContext):
        self.model, self.config, self.ctx = model, config, ctx
        self.shape = (task.channels, task.resolution, task.resolution)
        self.label = unconditional_label(model)
        self.random_draws, self.variation_draws = ctx.generator("pe-random"), ctx.generator("pe-variation")

    def _batches(self, n: int, make: Callable[[slice, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = []
        for start in range(0, n, self.config.batch_size):
            rows = slice(start, min(n, start + self.config.batch_size))
            labels = torch.full((rows.stop - rows.start,), self.label, dtype=torch.int64, device=self.ctx.device)
            with autocast(self.ctx.device, self.ctx.compute):
                out.append(make(rows, labels).float().cpu())
        return torch.cat(out)

    def random(self, n: int) -> torch.Tensor:
        """n fresh samples of the public model, float [n, C, H, W] in [-1, 1]."""
        return self._batches(n, lambda rows, labels: edm_sampler(
            self.model, labels, (len(labels), *self.shape), EDM, self.config.sampler_steps, self.random_draws))

    def vary(self, images: torch.Tensor, degree: int) -> torch.Tensor:
        """One variation of each image, starting at the sampler's noise level `degree`."""
        return self._batches(len(images), lambda rows, labels: edm_variation(
            self.model, images[rows], labels, EDM, self.config.sampler_steps, degree, self.variation_draws))

    def lookahead_features(self, images: torch.Tensor, degree: int, embed) -> torch.Tensor:
        """Each candidate's embedding for the vote: the mean embedding of `lookahead` variations of it
        (the candidate's own with lookahead 0)."""
        def features(x: torch.Tensor) -> torch.Tensor:
            return embed(to_uint8(x), self.ctx.device, self.ctx.progress)

        if self.config.lookahead == 0:
            return features(images)
        return torch.stack([features(self.vary(images, degree)) for _ in range(self.config.lookahead)]).mean(dim=0)
