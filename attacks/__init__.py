"""Membership-inference attacks and the privacy audit (imports as `privbench.attacks`).

One module per attack, registered in ATTACKS so that `--attack NAME` resolves here. An attack is a
class with
  name: str
  requires: frozenset[str]       the synthesizer capabilities it uses (privbench.capabilities):
                                 empty for a black-box attack, which sees only the samples
  settings: tuple[dict, ...]     candidate hyperparameters; `privbench.attacks.audit.run_attack`
                                 picks one on a calibration part of members/non-members that is
                                 disjoint from the part it is evaluated on
  score(target, candidates, setting, generator) -> np.ndarray   higher = "member"
Scores turn into ROC, TPR@FPR with intervals and an empirical epsilon lower bound in `audit.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from privbench.capabilities import DENOISER, capabilities
from privbench.data.base import ImageSet
from privbench.data.transforms import to_model
from privbench.registry import Registry

ATTACKS: Registry[type] = Registry("attack")
WHITE_BOX_BATCH = 256


@dataclass
class Target:
    """What an attack may look at: the fitted synthesizer and the synthetic images it produced."""

    synthesizer: Any
    samples: ImageSet
    device: torch.device

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network of a synthesizer that declares DENOISER (privbench.capabilities)."""
        if DENOISER not in capabilities(self.synthesizer):
            raise ValueError(f"{type(self.synthesizer).__name__} does not declare the {DENOISER!r} capability")
        return self.synthesizer.net


class Attack(Protocol):
    name: str
    requires: frozenset[str]
    settings: tuple[dict, ...]

    def score(self, target: Target, candidates: ImageSet, setting: dict, generator: torch.Generator) -> np.ndarray: ...


def missing(attack: type, target: Target) -> frozenset[str]:
    """The capabilities `attack` requires that the target's synthesizer does not declare."""
    return attack.requires - capabilities(target.synthesizer)


def applies(attack: type, target: Target) -> bool:
    """Black-box attacks apply to every run; white-box ones where the synthesizer declares what they use."""
    return not missing(attack, target)


@torch.no_grad()
def white_box_scores(
    target: Target, candidates: ImageSet, score: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
) -> np.ndarray:
    """`score(net, x, labels)` over the candidates in batches, x in [-1, 1] NCHW on the target's device."""
    net = target.denoiser.eval()
    out = []
    for start in range(0, len(candidates), WHITE_BOX_BATCH):
        x = to_model(candidates.images[start : start + WHITE_BOX_BATCH]).to(target.device)
        y = torch.from_numpy(candidates.labels[start : start + WHITE_BOX_BATCH]).to(target.device)
        out.append(score(net, x, y).double().cpu())
    return torch.cat(out).numpy()


from privbench.attacks import loss, nearest, pia, secmi  # noqa: E402  (register themselves)

__all__ = ["ATTACKS", "Attack", "Target", "applies", "missing", "white_box_scores", "loss", "nearest", "pia", "secmi"]
