"""Membership-inference attacks and the privacy audit (imports as `privbench.attacks`).

One module per attack, registered in ATTACKS so that `--attack NAME` resolves here. An attack is a
class with
  name: str
  needs: "model" | "samples"     white-box (the fitted diffusion model) or black-box (samples only)
  settings: tuple[dict, ...]     candidate hyperparameters; `privbench.attacks.audit.run_attack`
                                 picks one on a calibration part of members/non-members that is
                                 disjoint from the part it is evaluated on
  score(target, candidates, setting, generator) -> np.ndarray   higher = "member"
Scores turn into ROC, TPR@FPR with intervals and an empirical epsilon lower bound in `audit.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

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
    def net(self) -> torch.nn.Module | None:
        """The diffusion network of a white-box target, None for other synthesizers."""
        return getattr(self.synthesizer, "net", None)


class Attack(Protocol):
    name: str
    needs: Literal["model", "samples"]
    settings: tuple[dict, ...]

    def score(self, target: Target, candidates: ImageSet, setting: dict, generator: torch.Generator) -> np.ndarray: ...


def applies(attack: type, target: Target) -> bool:
    """Black-box attacks apply to every run; white-box ones to diffusion models."""
    return attack.needs == "samples" or target.net is not None


@torch.no_grad()
def white_box_scores(
    target: Target, candidates: ImageSet, score: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
) -> np.ndarray:
    """`score(net, x, labels)` over the candidates in batches, x in [-1, 1] NCHW on the target's device."""
    net = target.net.eval()
    out = []
    for start in range(0, len(candidates), WHITE_BOX_BATCH):
        x = to_model(candidates.images[start : start + WHITE_BOX_BATCH]).to(target.device)
        y = torch.from_numpy(candidates.labels[start : start + WHITE_BOX_BATCH]).to(target.device)
        out.append(score(net, x, y).double().cpu())
    return torch.cat(out).numpy()


from privbench.attacks import loss, nearest, pia, secmi  # noqa: E402  (register themselves)

__all__ = ["ATTACKS", "Attack", "Target", "applies", "white_box_scores", "loss", "nearest", "pia", "secmi"]
