"""The class-conditional UNet of the diffusion methods: a diffusers `UNet2DModel` behind one call.

`ConditionalUNet(x, c_noise, labels)` returns the raw network output, F_theta in the notation of
EDM (Karras et al., 2022, Eq. 7): the caller (`privbench.diffusion.edm.denoise`) scales its input
by c_in, feeds c_noise as the noise-level input and mixes the output into the denoiser
D = c_skip x + c_out F. Nothing about the noise schedule lives in the network.

Class conditioning uses `num_classes + 1` embeddings; index `num_classes` is the "no label" class
that classifier-free guidance trains on (label dropout) and samples with. Normalisation is GroupNorm
throughout, so the module passes Opacus' ModuleValidator and trains with per-sample gradients;
attention keys carry no bias (see `build_unet`).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

# EDM's networks use GroupNorm with up to 32 groups but never fewer than 4 channels per group.
MAX_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4


class ConditionalUNet(nn.Module):
    """F_theta(x, c_noise, labels) -> tensor shaped like x (EDM's raw network, before preconditioning)."""

    def __init__(self, unet: UNet2DModel, num_classes: int):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes

    @property
    def unconditional_label(self) -> int:
        """The label index meaning "no class", for classifier-free guidance."""
        return self.num_classes

    def forward(self, x: torch.Tensor, sigma_input: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, sigma_input, class_labels=labels).sample


def attention_modules(model: ConditionalUNet) -> list[Attention]:
    """The UNet's attention modules in the order it runs them: down path, middle, up path (diffusers
    registers the middle block last)."""
    unet = model.unet
    return [m for part in (unet.down_blocks, unet.mid_block, unet.up_blocks) for m in part.modules() if isinstance(m, Attention)]


def norm_groups(widths: tuple[int, ...]) -> int:
    """The GroupNorm group count of a UNet with these channel widths, or 0 if they have none in common."""
    groups = min(MAX_GROUPS, min(widths) // MIN_CHANNELS_PER_GROUP)
    return groups if groups >= 1 and not any(w % groups for w in widths) else 0


def build_unet(
    resolution: int,
    channels: int,
    num_classes: int,
    base_channels: int,
    channel_mult: tuple[int, ...],
    layers_per_block: int,
    attention_resolutions: tuple[int, ...],
) -> ConditionalUNet:
    """A class-conditional UNet on `channels` x `resolution` x `resolution` images.

    Level i has `base_channels * channel_mult[i]` channels at resolution `resolution / 2**i`, with
    self-attention where that resolution is in `attention_resolutions` (the middle block attends iff
    the lowest resolution does). The resolution must halve evenly `len(channel_mult) - 1` times.
    """
    levels = len(channel_mult)
    if levels < 1 or resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} must be divisible by 2**{levels - 1} for {levels} UNet levels")
    widths = tuple(base_channels * m for m in channel_mult)
    groups = norm_groups(widths)
    if not groups:
        raise ValueError(f"channel widths {widths} need a common GroupNorm group count")
    attends = [resolution // 2**i in attention_resolutions for i in range(levels)]
    unet = UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        add_attention=attends[-1],
        norm_num_groups=groups,
        num_class_embeds=num_classes + 1,
    )
    for module in unet.modules():
        if isinstance(module, Attention) and module.to_k.bias is not None:
            # A key bias adds the same q.b to every logit of a query, which softmax cancels: its
            # gradient is exactly zero, so it never learns, and its float-noise per-sample gradients
            # fail the DP engine's check that per-sample gradients sum to the batch gradient.
            module.to_k.register_parameter("bias", None)
    return ConditionalUNet(unet, num_classes)
