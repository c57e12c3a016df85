"""DP-LoRA: DP-SGD on low-rank adapters of a public-pretrained latent diffusion model, as
DPImageBench's DP_LORA (models/DP_LORA/ldm/models/diffusion/ddpm.py at 565f8d7, with peft's LoRA;
after Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, and its DP use in
Yu et al., "Differentially Private Fine-tuning of Language Models", ICLR 2022).

The autoencoder and the pre-trained UNet are privbench.diffusion.latent's, shared with DP-LDM (same
caches). Every query, key, value and output projection of the UNet's attention modules (DPImageBench's
model_lora_target [to_q, to_v, to_k, to_out.Linear]) becomes W x + B A x with A: d_in -> r and
B: r -> d_out, B zero at the start so the adapted network is the pre-trained one; W stays frozen, as
does every other pre-trained weight. DP-SGD trains A and B and, as DPImageBench's
train_condition_only with cond_stage_trainable does, the class embedding. The privacy argument is the
latent pipeline's: each member is one latent row, and each row's gradient on the trained parameters
is clipped.

Not reproduced: peft's bias='lora_only' also trains the output projection's bias; here the base
layer, bias included, is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from privbench.checks import POSITIVE_INT
from privbench.context import RunContext
from privbench.diffusion.latent import LatentDiffusionConfig, LatentDiffusionMethod
from privbench.methods import METHODS
from privbench.nets.unet import ConditionalUNet, attention_modules

PROJECTIONS = ("to_q", "to_k", "to_v")


@dataclass(frozen=True)
class DPLoRAConfig(LatentDiffusionConfig):
    lora_rank: int  # r of every adapter; its scale alpha / r is 1 (DPImageBench sets lora_alpha = r)

    def validate(self, where: str = "params.") -> None:
        super().validate(where, lora_rank=POSITIVE_INT)


class LoRALinear(nn.Module):
    """base(x) + up(down(x)): a frozen linear layer and its rank-r update as two nn.Linear, which every
    per-sample gradient mode of the DP engine supports. down is drawn as peft's "gaussian" init
    (std 1 / r), up starts at zero."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device
        self.down = nn.Linear(base.in_features, rank, bias=False, device=device)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=device)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


@METHODS.register("dp-lora")
class DPLoRA(LatentDiffusionMethod):
    name = "dp-lora"
    Config = DPLoRAConfig
    preset_files = ("diffusion", "latent", "dp_lora")

    def prepare(self, model: ConditionalUNet, ctx: RunContext) -> None:
        """Freeze the pre-trained UNet and adapt its attention projections, adapters drawn from the run seed."""
        model.requires_grad_(False)
        torch.manual_seed(ctx.stage_seed("lora-init"))
        rank = self.config.lora_rank
        for attention in attention_modules(model):
            for name in PROJECTIONS:
                setattr(attention, name, LoRALinear(getattr(attention, name), rank))
            attention.to_out[0] = LoRALinear(attention.to_out[0], rank)
        model.unet.class_embedding.requires_grad_(True)
