"""`loss`: the loss-threshold attack on diffusion models (Matsumoto, Miura and Yanai, "Membership
Inference Attacks against Diffusion Models", IEEE SPW 2023).

Training lowers the denoising loss of the training images, so members score higher on minus their
loss. The loss at one noise level is noisy in the injected noise: each query draws fresh noise and
the score averages `DRAWS` of them. The noise level is chosen on the calibration part.
"""

from __future__ import annotations

import numpy as np
import torch

from privbench.attacks import ATTACKS, Target, white_box_scores
from privbench.capabilities import DENOISER
from privbench.data.base import ImageSet
from privbench.diffusion.edm import per_example_loss
from privbench.diffusion.pipeline import EDM

DRAWS = 4


@ATTACKS.register("loss")
class LossAttack:
    name = "loss"
    requires = frozenset({DENOISER})
    settings = tuple({"sigma": s} for s in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0))

    def score(self, target: Target, candidates: ImageSet, setting: dict, generator: torch.Generator) -> np.ndarray:
        def minus_loss(net, x, y):
            total = torch.zeros(len(x), device=x.device)
            for _ in range(DRAWS):
                noise = torch.randn(x.shape, generator=generator).to(x.device)
                total += per_example_loss(net, x, y, setting["sigma"], noise, EDM)
            return -total / DRAWS

        return white_box_scores(target, candidates, minus_loss)
