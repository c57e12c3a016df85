"""Generators that map (noise, label) to images: the mean-embedding methods' and the GANs'."""

from __future__ import annotations

import torch
from torch import nn


# norm -> (the layer after a fully connected one, the layer after a convolution), given the width.
NORMS = {
    "batch": (nn.BatchNorm1d, nn.BatchNorm2d),
    "layer": (nn.LayerNorm, lambda channels: nn.GroupNorm(1, channels)),
}


class ConvGenerator(nn.Module):
    """Class-conditional convolutional generator in the shape DP-MERF uses for small images.

    (z, one-hot label) -> two fully connected layers -> a feature map at resolution / 2^k ->
    k blocks of (2x nearest upsampling, convolution) -> pixels in [0, 1] through a sigmoid.
    `norm` "batch" normalises over the batch (BatchNorm, where training is non-private: DP-MERF only
    sees the released embedding); "layer" normalises each image on its own (LayerNorm, GroupNorm of
    one group), so one generated image never depends on the others drawn beside it: a GAN whose
    generated images enter a member's clipped gradient needs that.
    """

    def __init__(
        self,
        z_dim: int,
        num_classes: int,
        resolution: int,
        out_channels: int,
        hidden: int = 200,
        channels: tuple[int, ...] = (16, 8),
        kernel_size: int = 5,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        flat, spatial = NORMS[norm]
        scale = 2 ** len(channels)
        if resolution % scale:
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channels)} (one per upsampling block)")
        self.z_dim, self.num_classes = z_dim, num_classes
        self.base = resolution // scale
        self.fc = nn.Sequential(
            nn.Linear(z_dim + num_classes, hidden), flat(hidden), nn.ReLU(),
            nn.Linear(hidden, channels[0] * self.base**2), flat(channels[0] * self.base**2), nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        widths = [*channels, out_channels]
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(channels) - 1
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)]
            blocks += [nn.Sigmoid()] if last else [spatial(c_out), nn.ReLU()]
        self.convs = nn.Sequential(*blocks)
        self.channels = channels

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        one_hot = nn.functional.one_hot(labels, self.num_classes).to(z.dtype)
        h = self.fc(torch.cat([z, one_hot], dim=1))
        return self.convs(h.view(len(z), self.channels[0], self.base, self.base))
