"""`pia`: Proximal Initialization Attack (Kong, Zhang, Liu and Li, "An Efficient Membership
Inference Attack for the Diffusion Model by Proximal Initialization", ICLR 2024).

PIA replaces random noise by the model's own noise estimate at t = 0, eps_0 = eps_theta(x_0, 0),
noises x_0 deterministically to time t with it, and measures how far the model's estimate there
moves from eps_0: members, fitted better, keep it closer. In EDM's variance-exploding form the
noising is x_t = x_0 + sigma_t eps_0 and "t = 0" is the smallest noise level, sigma_min. The score is
minus ||eps_theta(x_t, sigma_t) - eps_0||_p; sigma_t and p are chosen on the calibration part.
"""

from __future__ import annotations

import numpy as np
import torch

from privbench.attacks import ATTACKS, Target, white_box_scores
from privbench.capabilities import DENOISER
from privbench.data.base import ImageSet
from privbench.diffusion.edm import predicted_noise
from privbench.diffusion.pipeline import EDM


@ATTACKS.register("pia")
class PIA:
    name = "pia"
    requires = frozenset({DENOISER})
    settings = tuple({"sigma": s, "p": p} for s in (0.05, 0.1, 0.2, 0.5, 1.0) for p in (2, 4))

    def score(self, target: Target, candidates: ImageSet, setting: dict, generator: torch.Generator) -> np.ndarray:
        def minus_distance(net, x0, y):
            eps0 = predicted_noise(net, x0, EDM.sigma_min, y, EDM)
            xt = x0 + setting["sigma"] * eps0
            moved = predicted_noise(net, xt, setting["sigma"], y, EDM) - eps0
            return -moved.flatten(1).norm(p=setting["p"], dim=1)

        return white_box_scores(target, candidates, minus_distance)
