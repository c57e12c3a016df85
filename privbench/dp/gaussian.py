"""The Gaussian mechanism: release a statistic of the members with noise the ledger accounts for."""

from __future__ import annotations

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
