"""Discriminators for the GANs (DP-GAN, GS-WGAN): small, class-conditional, trainable with DP-SGD."""

from __future__ import annotations

import torch
from torch import nn


class ConvDiscriminator(nn.Module):
    """A convolutional projection discriminator (Miyato and Koyama 2018): (image, label) -> one score.

    k blocks of (4x4 convolution with stride 2, LeakyReLU) halve the resolution each (rounding down); the score is a
    linear function of the flattened features plus their inner product with the label's embedding.
    Nothing couples the images of a batch (no BatchNorm), so each image's score, and its gradient,
    depends on that image alone: what per-example clipping needs.
    """

    def __init__(self, resolution: int, in_channels: int, num_classes: int, channels: tuple[int, ...] = (32, 64)):
        super().__init__()
        widths = [in_channels, *channels]
        layers: list[nn.Module] = []
        side = resolution
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            side //= 2  # what a 4x4 convolution with stride 2 and padding 1 leaves of the side
        if side < 1:
            raise ValueError(f"{len(channels)} stride-2 blocks leave nothing of a {resolution}x{resolution} image")
        self.features = nn.Sequential(*layers, nn.Flatten())
        width = channels[-1] * side**2
        self.score = nn.Linear(width, 1)
        self.embedding = nn.Embedding(num_classes, width)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.score(h).squeeze(1) + (self.embedding(labels) * h).sum(1)
