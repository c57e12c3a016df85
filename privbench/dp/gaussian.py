"""The Gaussian mechanism: release a statistic of the members with noise the ledger accounts for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
        raise ValueError(f"{mechanism.name}: a Gaussian release is one full-data step (repeated ones are "
                         f"RepeatedReleases), got {mechanism}")
    ledger.record(mechanism)
    noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device=generator.device)
    noisy = value + mechanism.noise_std * noise.to(value.device)
    return from_rank0(noisy.cpu()).to(value.device)


class _Releases:
    """Repeated Gaussian releases of one mechanism, recorded in `ledger` on creation: iterating
    yields, `mechanism.steps` times, what the next release is of (`_draw`); `release(value)` then
    adds N(0, noise_std^2) noise to that step's statistic. Every draw must be released exactly once
    before the next is made, and the loop must run to its end: the releases made are the releases
    accounted, which `finish()` checks. Draws and noise both come from `generator` (the run's
    mechanism generator)."""

    draw_noun = "draw"  # what one step draws, in the error messages

    def __init__(self, ledger: PrivacyLedger, mechanism: Mechanism, generator: torch.Generator):
        self.mechanism, self.generator = ledger.record(mechanism), generator
        self.drawn = self.released = 0

    def _draw(self) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        if self.drawn:
            raise RuntimeError(f"{self.mechanism.name}: the releases were already made")
        for _ in range(self.mechanism.steps):
            if self.released != self.drawn:
                raise RuntimeError(f"{self.mechanism.name}: {self.draw_noun} {self.drawn} was drawn but not released")
            drawn = self._draw()
            self.drawn += 1
            yield from_rank0(drawn)

    def release(self, value: torch.Tensor) -> torch.Tensor:
        """This step's statistic `value` (L2 sensitivity at most `mechanism.sensitivity` under adding or
        removing one member) plus the mechanism's noise."""
        if self.released != self.drawn - 1:
            raise RuntimeError(f"{self.mechanism.name}: a release needs a fresh {self.draw_noun}")
        self.released += 1
        noise = torch.randn(value.shape, generator=self.generator, dtype=value.dtype, device=self.generator.device)
        return from_rank0((value + self.mechanism.noise_std * noise.to(value.device)).cpu()).to(value.device)

    def finish(self) -> None:
        """Check that the releases made are the `mechanism.steps` the ledger accounts for."""
        if self.released != self.mechanism.steps:
            raise RuntimeError(f"{self.mechanism.name}: {self.released} releases made, {self.mechanism.steps} accounted")


class RepeatedReleases(_Releases):
    """A Gaussian release of a statistic of all members, repeated: the Gaussian mechanism (sigma,
    q = 1, steps) of `mechanism`, calibrated and recorded as one mechanism with its step count (each
    step's statistic may depend on the earlier noisy releases: adaptive composition). Iterating
    yields the step's index."""

    draw_noun = "step"

    def __init__(self, ledger: PrivacyLedger, mechanism: Mechanism, generator: torch.Generator):
        if mechanism.kind != "gaussian" or mechanism.sample_rate != 1.0:
            raise ValueError(f"{mechanism.name}: repeated releases of all members are Gaussian with sample rate 1, "
                             f"got {mechanism}")
        super().__init__(ledger, mechanism, generator)

    def _draw(self) -> int:
        return self.drawn


class SubsampledReleases(_Releases):
    """Repeated Gaussian releases of a sum over Poisson-subsampled members: the subsampled Gaussian
    mechanism (sigma, q, steps) of `mechanism`. Iterating yields the indices of a Poisson sample of
    `population` members (each kept independently with probability q)."""

    draw_noun = "sample"

    def __init__(self, ledger: PrivacyLedger, mechanism: Mechanism, population: int, generator: torch.Generator):
        if mechanism.kind != "gaussian":
            raise ValueError(f"{mechanism.name}: subsampled releases are Gaussian mechanisms, got {mechanism.kind!r}")
        super().__init__(ledger, mechanism, generator)
        self.population = population

    def _draw(self) -> torch.Tensor:
        keep = torch.rand(self.population, generator=self.generator) < self.mechanism.sample_rate
        return keep.nonzero().flatten()


class SelectedReleases(_Releases):
    """Repeated Gaussian releases, each of the statistic of one part of the members drawn uniformly
    from `parts`: the selected-Gaussian mechanism (sigma, q = 1 / parts, steps) of `mechanism`
    (privbench.dp.ledger says how it composes). Iterating yields the index of the part drawn; the
    statistic released is of that part alone, with L2 sensitivity at most `mechanism.sensitivity`
    to adding or removing one of its members. Which part a step used must stay secret: the draw comes
    from the mechanism generator too.
    """

    draw_noun = "part draw"

    def __init__(self, ledger: PrivacyLedger, mechanism: Mechanism, parts: int, generator: torch.Generator):
        if mechanism.kind != "selected-gaussian" or abs(mechanism.sample_rate * parts - 1) > 1e-12:
            raise ValueError(f"{mechanism.name}: one of {parts} parts per step is a selected-Gaussian mechanism "
                             f"with sample rate 1/{parts}, got {mechanism}")
        super().__init__(ledger, mechanism, generator)
        self.parts = parts

    def _draw(self) -> int:
        return int(torch.randint(self.parts, (1,), generator=self.generator))
