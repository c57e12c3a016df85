"""PDP-Diffusion (Ghalebikesabi et al., "Differentially Private Diffusion Models Generate Useful
Synthetic Images", arXiv 2302.13861, 2023): pre-train on all public images, then DP-SGD fine-tune.

The public classes do not name the sensitive ones, so pre-training here is unconditional (every
public image carries the "no class" label) and the class embeddings are learnt during private
fine-tuning. PrivImage differs from this method in exactly one step: it pre-trains on the public
classes its private semantic query selects, conditioned on the sensitive labels.
"""

from __future__ import annotations

from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.diffusion.pipeline import DiffusionMethod, PretrainedDiffusionConfig
from privbench.dp import PrivacyLedger
from privbench.methods import METHODS


@METHODS.register("pdp-diffusion")
class PDPDiffusion(DiffusionMethod):
    name = "pdp-diffusion"
    Config = PretrainedDiffusionConfig
    uses_public = True
    preset_files = ("diffusion", "pdp_diffusion")

    def pretraining_set(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> tuple[ImageSet, bool]:
        return task.public, False
