"""DP-LDM (Lyu, Liu, Vinaroz, Park, Sutherland, "Differentially Private Latent Diffusion Models",
TMLR 2024, arXiv 2305.15759): an autoencoder and a latent diffusion model trained on public data,
then DP-SGD fine-tuning of the attention modules and the conditioning embedding only.

The training path is privbench.diffusion.latent (its docstring gives the privacy argument: the
encoder is fixed before DP-SGD, so each member is one latent row and per-example clipping of the
UNet's gradients bounds its contribution as in DPDM). What is trained, as DPImageBench's
LatentDiffusion.configure_optimizers does with train_condition_only (models/DP_LDM/ldm/models/
diffusion/ddpm.py at 565f8d7): every attention module from the `tuned_attention_from`-th on, counted
in the order the network runs them (down path, middle, up path: LDM's input, middle and output
blocks; its `ablation_blocks`), and the class embedding. Everything else of the pre-trained UNet is frozen.

What differs from the paper's network: privbench's UNet conditions on the class by adding its
embedding to the noise-level embedding (privbench.nets.unet), where LDM feeds it to cross-attention
inside its SpatialTransformers; the trained set is the same in name (attention and the class
embedding), but the class reaches the frozen residual blocks through their (frozen) projections of
that sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from privbench.checks import POSITIVE_INT
from privbench.context import RunContext
from privbench.diffusion.latent import LatentDiffusionConfig, LatentDiffusionMethod
from privbench.methods import METHODS
from privbench.nets.unet import ConditionalUNet, attention_modules


@dataclass(frozen=True)
class DPLDMConfig(LatentDiffusionConfig):
    tuned_attention_from: int  # the first attention module DP-SGD trains, counted from 1 (1: all of them)

    def validate(self, where: str = "params.") -> None:
        super().validate(where, tuned_attention_from=POSITIVE_INT)


@METHODS.register("dp-ldm")
class DPLDM(LatentDiffusionMethod):
    name = "dp-ldm"
    Config = DPLDMConfig
    preset_files = ("diffusion", "latent", "dp_ldm")

    def prepare(self, model: ConditionalUNet, ctx: RunContext) -> None:
        model.requires_grad_(False)
        for module in attention_modules(model)[self.config.tuned_attention_from - 1 :]:
            module.requires_grad_(True)
        model.unet.class_embedding.requires_grad_(True)
