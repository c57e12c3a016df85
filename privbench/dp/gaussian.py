"""The Gaussian mechanism: release a statistic of the members with noise the ledger accounts for."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from privbench.dp.distributed import from_rank0
from privbench.dp.ledger import Mechanism, PrivacyLedger


def release_gaussian(
    ledger: PrivacyLedger, mechanism: Mechanism, value: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Record `mechanism` in `ledger`, then return `value` plus N(0, mechanism.noise_std^2) noise.

    The noise is drawn from the very mechanism object the ledger holds, so the noise used and
    the noise accounted cannot drift apart. `value` must have L2 sensitivity at most
    `mechanism.sensitivity` under adding or removing one member; the caller guarantees that.
    Under torchrun every rank fits alike, but with noise from the OS (privacy.randomness: os) each
    would draw its own: rank 0's release is the one made, and every rank receives it.
    """
    if mechanism.kind != "gaussian" or mechanism.sample_rate != 1.0 or mechanism.steps != 1:
        raise ValueError(f"{mechanism.name}: a Gaussian release is one full-data step, got {mechanism}")
    ledger.record(mechanism)
    noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device=generator.device)
    noisy = value + mechanism.noise_std * noise.to(value.device)
    return from_rank0(noisy.cpu()).to(value.device)


class SubsampledReleases:
    """Repeated Gaussian releases of a sum over Poisson-subsampled members: the subsampled Gaussian
    mechanism (sigma, q, steps) of `mechanism`, recorded in `ledger` on creation.

    Iterating yields, `mechanism.steps` times, the indices of a Poisson sample of `population`
    members (each kept independently with probability q); `release(value)` then adds
    N(0, noise_std^2) noise to that sample's statistic. Every sample must be released exactly once
    before the next is drawn, and the loop must run to its end: the releases made are the releases
    accounted, which `finish()` checks. Sample and noise both come from `generator` (the run's
    mechanism generator).
    """

    def __init__(self, ledger: PrivacyLedger, mechanism: Mechanism, population: int, generator: torch.Generator):
        if mechanism.kind != "gaussian":
            raise ValueError(f"{mechanism.name}: subsampled releases are Gaussian mechanisms, got {mechanism.kind!r}")
        self.mechanism, self.population, self.generator = ledger.record(mechanism), population, generator
        self.sampled = self.released = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.sampled:
            raise RuntimeError(f"{self.mechanism.name}: the releases were already made")
        for _ in range(self.mechanism.steps):
            if self.released != self.sampled:
                raise RuntimeError(f"{self.mechanism.name}: sample {self.sampled} was drawn but not released")
            keep = torch.rand(self.population, generator=self.generator) < self.mechanism.sample_rate
            self.sampled += 1
            yield from_rank0(keep.nonzero().flatten())

    def release(self, value: torch.Tensor) -> torch.Tensor:
        """The current sample's statistic `value` (L2 sensitivity at most `mechanism.sensitivity` under
        adding or removing one member) plus the mechanism's noise."""
        if self.released != self.sampled - 1:
            raise RuntimeError(f"{self.mechanism.name}: a release needs a fresh sample")
        self.released += 1
        noise = torch.randn(value.shape, generator=self.generator, dtype=value.dtype, device=self.generator.device)
        return from_rank0((value + self.mechanism.noise_std * noise.to(value.device)).cpu()).to(value.device)

    def finish(self) -> None:
        """Check that the releases made are the `mechanism.steps` the ledger accounts for."""
        if self.released != self.mechanism.steps:
            raise RuntimeError(f"{self.mechanism.name}: {self.released} releases made, {self.mechanism.steps} accounted")


class SelectedReleases:
    """Repeated Gaussian releases, each of the statistic of one part of the members drawn uniformly
    from `parts`: the selected-Gaussian mechanism (sigma, q = 1 / parts, steps) of `mechanism`,
    recorded in `ledger` on creation (privbench.dp.ledger says how it composes).

    Iterating yields, `mechanism.steps` times, the index of the part drawn; `release(value)` then adds
    N(0, noise_std^2) noise to a statistic of that part alone, whose L2 sensitivity to adding or
    removing one of its members is at most `mechanism.sensitivity`. As with SubsampledReleases, every
    draw is released exactly once and `finish()` checks that the releases made are those accounted.
    Draw and noise both come from `generator` (the run's mechanism generator): which part a step
    used must stay secret.
    """

    def __init__(self, ledger: PrivacyLedger, mechanism: Mechanism, parts: int, generator: torch.Generator):
        if mechanism.kind != "selected-gaussian" or abs(mechanism.sample_rate * parts - 1) > 1e-12:
            raise ValueError(f"{mechanism.name}: one of {parts} parts per step is a selected-Gaussian mechanism "
                             f"with sample rate 1/{parts}, got {mechanism}")
        self.mechanism, self.parts, self.generator = ledger.record(mechanism), parts, generator
        self.drawn = self.released = 0

    def __iter__(self) -> Iterator[int]:
        if self.drawn:
            raise RuntimeError(f"{self.mechanism.name}: the releases were already made")
        for _ in range(self.mechanism.steps):
            if self.released != self.drawn:
                raise RuntimeError(f"{self.mechanism.name}: part draw {self.drawn} was not released")
            part = int(torch.randint(self.parts, (1,), generator=self.generator))
            self.drawn += 1
            yield from_rank0(part)

    def release(self, value: torch.Tensor) -> torch.Tensor:
        """The drawn part's statistic `value` plus the mechanism's noise."""
        if self.released != self.drawn - 1:
            raise RuntimeError(f"{self.mechanism.name}: a release needs a fresh draw")
        self.released += 1
        noise = torch.randn(value.shape, generator=self.generator, dtype=value.dtype, device=self.generator.device)
        return from_rank0((value + self.mechanism.noise_std * noise.to(value.device)).cpu()).to(value.device)

    def finish(self) -> None:
        """Check that the releases made are the `mechanism.steps` the ledger accounts for."""
        if self.released != self.mechanism.steps:
            raise RuntimeError(f"{self.mechanism.name}: {self.released} releases made, {self.mechanism.steps} accounted")
