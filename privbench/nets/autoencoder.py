"""The first stage of latent diffusion: a small convolutional autoencoder, KL-regularised or plain.

After Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022),
Sec. 3.1: the encoder maps an image x to a Gaussian posterior N(mu(x), diag(exp(logvar(x)))) over
latents z of side `resolution / 2**(levels - 1)` with `latent_channels` channels; the decoder maps z
back. Training minimises |x - D(z)| + kl_weight * KL(q(z|x) || N(0, I)) with z drawn from the
posterior; `kl_weight = 0` gives a plain autoencoder (encoder outputs mu only).

`encode` returns the posterior mean, a deterministic function of the image: the latent a
diffusion model trains on depends on one image alone, which is what the DP-SGD argument for the
latent methods needs. Latents leave `encode` multiplied by `latent_scale`, a buffer set from the
public latents' spread (the LDM paper's rescaling, Sec. 4.3.2) so that they match EDM's sigma_data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from privbench.nets.unet import norm_groups


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  nn.GroupNorm(groups, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _stack(widths: list[int], layers: int, groups: int, resample) -> list[nn.Module]:
    """`layers` residual blocks per width, `resample(width)` between consecutive widths."""
    blocks: list[nn.Module] = []
    for i, width in enumerate(widths):
        if i:
            blocks.append(resample(widths[i - 1]))
        blocks += [_ResBlock(widths[i - 1] if i and not j else width, width, groups) for j in range(layers)]
    return blocks


class Autoencoder(nn.Module):
    """encode: [B, C, H, W] in [-1, 1] -> [B, latent_channels, H / f, W / f]; decode: back. f = 2**(levels - 1)."""

    def __init__(self, channels: int, base_channels: int, channel_mult: tuple[int, ...], layers_per_block: int,
                 latent_channels: int, kl: bool):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        groups = norm_groups(tuple(widths))
        if not groups:
            raise ValueError(f"autoencoder widths {widths} need a common GroupNorm group count")
        self.kl, self.factor, self.latent_channels = kl, 2 ** (len(widths) - 1), latent_channels
        moments = 2 * latent_channels if kl else latent_channels
        down = lambda c: nn.Conv2d(c, c, 3, stride=2, padding=1)  # noqa: E731
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, padding=1), *_stack(widths, layers_per_block, groups, down),
            nn.GroupNorm(groups, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], moments, 3, padding=1))
        reversed_widths = widths[::-1]
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, reversed_widths[0], 3, padding=1),
            *_stack(reversed_widths, layers_per_block, groups, _Upsample),
            nn.GroupNorm(groups, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1))
        self.register_buffer("latent_scale", torch.ones(()))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x), unscaled; logvar is 0 (unused) for a plain autoencoder."""
        moments = self.encoder(x)
        if not self.kl:
            return moments, torch.zeros_like(moments)
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled posterior mean: deterministic given the (public-trained) weights."""
        return self.posterior(x)[0] * self.latent_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in model range from scaled latents."""
        return self.decoder(z / self.latent_scale)

    def forward(self, x: torch.Tensor, eps: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """Per-row training loss: the L1 reconstruction error of z = mu + exp(logvar / 2) eps (of mu
        for a plain autoencoder) plus kl_weight * KL(q(z | x) || N(0, I))."""
        mu, logvar = self.posterior(x)
        if not self.kl:
            return (x - self.decoder(mu)).abs().flatten(1).sum(1)
        z = mu + (logvar / 2).exp() * eps
        return (x - self.decoder(z)).abs().flatten(1).sum(1) + kl_weight * kl_divergence(mu, logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
