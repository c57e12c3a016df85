"""DPDM: differentially private diffusion models (Dockhorn, Cao, Vahdat and Kreis, TMLR 2023).

DP-SGD from scratch on the members, no public data. Its contribution is noise multiplicity: each
member's loss is averaged over K draws of (noise level, noise) before its gradient is clipped, which
lowers the gradient's variance at no privacy cost (`dp.multiplicity`). The training path is the
shared diffusion pipeline with nothing to pre-train on.
"""

from __future__ import annotations

from privbench.diffusion.pipeline import DiffusionConfig, DiffusionMethod
from privbench.methods import METHODS


@METHODS.register("dpdm")
class DPDM(DiffusionMethod):
    name = "dpdm"
    Config = DiffusionConfig
    uses_public = False
    preset_files = ("diffusion", "dpdm")
