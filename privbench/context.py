"""What a method receives besides the ledger: its task (the data it may see) and its run context."""

from __future__ import annotations

import hashlib
import logging
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privbench.compute import ComputeConfig
from privbench.data.base import ImageSet
from privbench.metrics.cost import CostRecorder, Stage
from privbench.privacy import PrivacyConfig


@dataclass(frozen=True)
class Task:
    """The data a method may use. `members` are sensitive: only ledger-guarded code reads them.

    Non-members, validation and test images never reach a method; they stay with the harness.
    """

    members: ImageSet
    public: ImageSet | None
    classes: tuple[str, ...]

    @property
    def resolution(self) -> int:
        return self.members.resolution

    @property
    def channels(self) -> int:
        return self.members.channels


@dataclass
class RunContext:
    """Where a run writes, which device it uses, the seeded randomness of each of its stages (and
    where its mechanisms' randomness comes from), and the recorder its stages' compute cost goes to."""

    run_dir: Path
    cache_dir: Path
    device: torch.device
    seed: int
    progress: bool = True
    log: logging.Logger = logging.getLogger("privbench.run")
    costs: CostRecorder = field(default_factory=CostRecorder)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    canaries: Any = None  # an audited run's privbench.attacks.canaries.CanaryAudit, which its DP-SGD phase plants

    def stage(self, name: str) -> AbstractContextManager[Stage]:
        """Measure a stage of the method's work (e.g. "pretrain", "dp-train") on the run's device."""
        return self.costs.stage(name, self.device)

    def stage_seed(self, stage: str) -> int:
        """A seed for `stage` derived from the run seed: stages draw independent streams, and the
        same (seed, stage) always gives the same stream, whatever ran before it."""
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{stage}".encode()).digest()[:8], "little") >> 1

    def generator(self, stage: str) -> torch.Generator:
        """A CPU torch generator for `stage` (CPU draws are reproducible across devices)."""
        return torch.Generator().manual_seed(self.stage_seed(stage))

    def device_generator(self, stage: str) -> torch.Generator:
        """A generator for `stage` on the run's device, for draws made inside a training loop, where a
        CPU draw would cost a host-to-device copy per step (on CPU, the same stream as `generator`)."""
        return torch.Generator(self.device).manual_seed(self.stage_seed(stage))

    def rng(self, stage: str) -> np.random.Generator:
        return np.random.default_rng(self.stage_seed(stage))

    def mechanism_generator(self, stage: str, on_device: bool = False) -> torch.Generator:
        """The generator of every draw a privacy guarantee rests on: a release's noise, DP-SGD's noise
        and its Poisson sampling (on the run's device with `on_device`, else on CPU).

        privacy.randomness seeded: `stage`'s stream from the run seed, the very stream `generator` and
        `device_generator` give, so benchmark runs repeat bit for bit; but the seed is published with
        the configuration, and whoever knows it can regenerate the noise and the batches.
        os: a generator seeded from 63 bits of the operating system's entropy, drawn per call and kept
        nowhere, so no record of the run can regenerate the draws. That is the seed secrecy the
        guarantee needs (the noise unknown, the subsampling secret, as amplification by subsampling
        assumes). torch's generators are not cryptographic: like Opacus outside its secure_mode, this
        does not defend against an adversary who reconstructs a generator's state from released values.
        """
        device = self.device if on_device else torch.device("cpu")
        seed = secrets.randbits(63) if self.privacy.randomness == "os" else self.stage_seed(stage)
        return torch.Generator(device).manual_seed(seed)
