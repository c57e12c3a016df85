"""`secmi`: SecMI_stat (Duan, Kong, Wang, Shi and Xu, "Are Diffusion Models Vulnerable to
Membership Inference Attacks?", ICML 2023).

The t-error: carry x_0 to time t by deterministic DDIM inversion, invert one step further to t + dt,
denoise one deterministic step back to t and compare with where the inversion was at t. The
model's deterministic dynamics are more nearly reversible on its training images, so members have
smaller t-errors; the score is minus the squared error. In EDM's terms every step is an Euler step
of the probability-flow ODE (`ode_step`), the inversion runs over `INVERSION_STEPS` noise levels
spaced geometrically from sigma_min to sigma_t, and t + dt is sigma_t * `STEP_RATIO`. sigma_t is
chosen on the calibration part.
"""

from __future__ import annotations

import numpy as np
import torch

from privbench.attacks import ATTACKS, Target, white_box_scores
from privbench.capabilities import DENOISER
from privbench.data.base import ImageSet
from privbench.diffusion.edm import ode_step
from privbench.diffusion.pipeline import EDM

INVERSION_STEPS = 4
STEP_RATIO = 1.5


@ATTACKS.register("secmi")
class SecMI:
    name = "secmi"
    requires = frozenset({DENOISER})
    settings = tuple({"sigma": s} for s in (0.05, 0.1, 0.2, 0.5, 1.0))

    def score(self, target: Target, candidates: ImageSet, setting: dict, generator: torch.Generator) -> np.ndarray:
        sigma_t = setting["sigma"]
        levels = np.geomspace(EDM.sigma_min, sigma_t, INVERSION_STEPS + 1).tolist()

        def minus_t_error(net, x, y):
            for lo, hi in zip(levels[:-1], levels[1:]):
                x = ode_step(net, x, lo, hi, y, EDM)
            further = ode_step(net, x, sigma_t, sigma_t * STEP_RATIO, y, EDM)
            back = ode_step(net, further, sigma_t * STEP_RATIO, sigma_t, y, EDM)
            return -(back - x).pow(2).flatten(1).sum(1)

        return white_box_scores(target, candidates, minus_t_error)
