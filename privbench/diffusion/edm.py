"""EDM: preconditioning, training loss and deterministic sampler as small functions.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
NeurIPS 2022. Equation and table numbers below refer to that paper. Data y lives in [-1, 1]
(float NCHW); noise levels sigma are standard deviations of the Gaussian noise added to y.

The network `net(x, c_noise, labels)` is the raw F_theta (see `privbench.nets.unet`); everything
about sigma lives world: D_theta(x; sigma) = c_skip x + c_out F_theta(c_in x; c_noise) (Eq. 7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from privbench.compute import ComputeConfig, autocast, compiled, in_layout, lay_out
from privbench.dp.distributed import current_world, replicate
from privbench.errors import PrivbenchError


@dataclass(frozen=True)
class EDMConfig:
    """EDM's hyperparameters (Table 1, "Ours"): data scale, training noise distribution, sampling range."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


def precondition(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) of Table 1: unit-variance network input and training target."""
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = 1 / total.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def _per_row(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (scalar or [B]) as a [B, 1, 1, 1] tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).flatten()
    return sigma.expand(x.shape[0]).reshape(-1, 1, 1, 1)


def denoise(net: nn.Module, x: torch.Tensor, sigma, labels: torch.Tensor, cfg: EDMConfig) -> torch.Tensor:
    """D_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma)) (Eq. 7)."""
    sigma = _per_row(sigma, x)
    c_skip, c_out, c_in, c_noise = precondition(sigma, cfg.sigma_data)
    return c_skip * x + c_out * net(c_in * x, c_noise.flatten(), labels)


def predicted_noise(net: nn.Module, x: torch.Tensor, sigma, labels: torch.Tensor, cfg: EDMConfig) -> torch.Tensor:
    """eps_theta(x; sigma) = (x - D_theta(x; sigma)) / sigma: the noise the denoiser believes x holds,
    the quantity DDPM-style attacks (PIA, SecMI) compare."""
    return (x - denoise(net, x, sigma, labels, cfg)) / _per_row(sigma, x)


def ode_step(net: nn.Module, x: torch.Tensor, sigma_from: float, sigma_to: float, labels: torch.Tensor, cfg: EDMConfig) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = eps_theta(x; sigma) (Eq. 4 with
    sigma(t) = t) from sigma_from to sigma_to: deterministic denoising when sigma_to < sigma_from,
    deterministic inversion (DDIM inversion) when sigma_to > sigma_from."""
    return x + (sigma_to - sigma_from) * predicted_noise(net, x, sigma_from, labels, cfg)


def sample_sigma(n: int, cfg: EDMConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """n training noise levels with ln(sigma) ~ N(P_mean, P_std^2) (Table 1, training distribution)."""
    return (cfg.p_mean + cfg.p_std * torch.randn(n, generator=generator, device=_device_of(generator))).exp()


def _device_of(generator: torch.Generator | None) -> torch.device | None:
    """Draws happen where their generator lives (a CUDA generator saves a host copy per step)."""
    return None if generator is None else generator.device


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1): 1 / c_out^2, so the
    effective training target of F_theta has unit weight at every noise level."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def per_example_loss(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, sigma, noise: torch.Tensor, cfg: EDMConfig
) -> torch.Tensor:
    """lambda(sigma) * mean_pixels (D_theta(y + sigma n; sigma) - y)^2, one value per example (Eq. 8).

    With sigma and n given rather than drawn, this is also the loss membership-inference attacks
    probe at noise levels and noises of their choosing.
    """
    sigma = _per_row(sigma, images)
    denoised = denoise(net, images + sigma * noise, sigma, labels, cfg)
    return loss_weight(sigma, cfg.sigma_data).flatten() * (denoised - images).pow(2).flatten(1).mean(1)


def unconditional_label(net: nn.Module) -> int:
    """The "no class" label of the conditional network inside `net` (also through an Opacus wrapper)."""
    for module in net.modules():
        label = getattr(module, "unconditional_label", None)
        if label is not None:
            return int(label)
    raise ValueError(f"{type(net).__name__} has no unconditional label; build it with privbench.nets.unet.build_unet")


def diffusion_loss_fn(
    cfg: EDMConfig, generator: torch.Generator | None = None, label_dropout: float = 0.0
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss `loss_fn(model, images, labels) -> [rows]` for `train_dp_sgd` and `train_plain`.

    Every row draws its own sigma and noise, so the DP engine's K repeated rows of one example are K
    independent draws (noise multiplicity). With probability `label_dropout` a row's label becomes
    the unconditional one, training the unconditional model that classifier-free guidance needs.
    Draws come from `generator` on its own device and move to the data's: a CPU generator gives the
    same losses on every device, a CUDA one saves a host-to-device copy per step. Every
    grad_sample_mode runs the forward as one ordinary batched call (per-sample gradients or norms
    come from the backward), so drawing here gives each row its own draw.
    """
    if not 0 <= label_dropout < 1:
        raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        sigma = sample_sigma(n, cfg, generator).to(images.device, images.dtype)
        noise = torch.randn(images.shape, generator=generator, device=_device_of(generator)).to(images.device, images.dtype)
        if label_dropout > 0:
            drop = (torch.rand(n, generator=generator, device=_device_of(generator)) < label_dropout).to(labels.device)
            labels = torch.where(drop, torch.full_like(labels, unconditional_label(model)), labels)
        return per_example_loss(model, images, labels, sigma, noise, cfg)

    return loss_fn


def sigma_steps(steps: int, cfg: EDMConfig) -> torch.Tensor:
    """The sampling noise levels of Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho)
    - sigma_max^(1/rho)))^rho for i < N, then sigma_N = 0. Float64, N + 1 values."""
    if steps < 2:
        raise ValueError(f"the EDM sampler needs at least 2 steps, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    hi, lo = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    sigmas = (hi + i / (steps - 1) * (lo - hi)) ** cfg.rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _guided_denoise(net, x, sigma, labels, cfg, guidance: float) -> torch.Tensor:
    """D with classifier-free guidance: D_uncond + w (D_cond - D_uncond), both in one batched call."""
    if guidance == 1.0:
        return denoise(net, x, sigma, labels, cfg)
    uncond = torch.full_like(labels, unconditional_label(net))
    both = denoise(net, torch.cat([x, x]), sigma, torch.cat([labels, uncond]), cfg)
    cond, free = both.chunk(2)
    return free + guidance * (cond - free)


def _heun_path(net: nn.Module, x: torch.Tensor, sigmas: list[float], labels: torch.Tensor, cfg: EDMConfig,
               guidance: float) -> torch.Tensor:
    """Algorithm 1's loop: from x (float64) at sigmas[0] along the decreasing `sigmas`, Heun's
    second-order method on dx/dsigma = (x - D(x; sigma)) / sigma, an Euler step into a final 0."""
    for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
        d = (x - _guided_denoise(net, x.float(), cur, labels, cfg, guidance).double()) / cur
        euler = x + (nxt - cur) * d
        if nxt > 0:
            d_next = (euler - _guided_denoise(net, euler.float(), nxt, labels, cfg, guidance).double()) / nxt
            euler = x + (nxt - cur) * (d + d_next) / 2
        x = euler
    return x.float().clamp(-1, 1)


def _device(net: nn.Module, labels: torch.Tensor) -> torch.device:
    param = next(iter(net.parameters()), None)
    return labels.device if param is None else param.device  # a parameter-free net runs where labels are


@torch.no_grad()
def edm_sampler(
    net: nn.Module,
    labels: torch.Tensor,
    shape: Sequence[int],
    cfg: EDMConfig,
    steps: int,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] from EDM's deterministic sampler (Algorithm 1).

    Heun's second-order method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    (Eq. 4 with sigma(t) = t, s(t) = 1) along `sigma_steps`, with an Euler step into sigma = 0.
    It uses 2 * steps - 1 network evaluations (twice that with guidance). The only randomness is the
    initial x_0 ~ N(0, sigma_max^2 I), drawn from the CPU `generator`.
    """
    device = _device(net, labels)
    sigmas = sigma_steps(steps, cfg).tolist()
    x = (torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * sigmas[0]).to(device)
    return _heun_path(net, x, sigmas, labels.to(device), cfg, guidance)


@torch.no_grad()
def edm_variation(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: EDMConfig,
    steps: int,
    start: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Variations [B, C, H, W] in [-1, 1] of `images` (in [-1, 1]): SDEdit (Meng et al., ICLR 2022)
    on EDM's sampler. Each image is noised to sigma_start, the `start`-th of the sampler's `steps`
    noise levels (`sigma_steps`), y + sigma_start n with n ~ N(0, I) from the CPU `generator`, and
    denoised along the remaining levels. start = 0 keeps nothing of the image at sigma_max = 80
    (a fresh sample); a larger start keeps more. 2 * (steps - start) - 1 network evaluations.
    """
    if not 0 <= start < steps:
        raise ValueError(f"the variation must start at one of the sampler's {steps} noise levels, got {start}")
    device = _device(net, labels)
    sigmas = sigma_steps(steps, cfg).tolist()[start:]
    noise = torch.randn(tuple(images.shape), generator=generator, dtype=torch.float64)
    x = (images.double().cpu() + sigmas[0] * noise).to(device)
    return _heun_path(net, x, sigmas, labels.to(device), cfg, 1.0)


def plain_step(forward: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
               loss_fn: Callable[..., torch.Tensor], batch: Sequence[torch.Tensor], compute: ComputeConfig) -> None:
    """One non-private step: the optimizer on the mean of `loss_fn(forward, *batch)`'s per-row losses."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(batch[0].device, compute):
        loss = loss_fn(forward, *batch).float().mean()
    loss.backward()
    optimizer.step()


def train_plain(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    tensors: Sequence[torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator | None = None,
    ema_decay: float = 0.999,
    progress: bool = False,
    compute: ComputeConfig = ComputeConfig(),
) -> tuple[nn.Module, nn.Module]:
    """Non-private training (public pre-training): Adam on the mean of `loss_fn(model, *batch)`.

    Batches of `batch_size` rows are drawn uniformly with replacement from `tensors` with the CPU
    `generator`. Returns the trained model and an EMA copy of its weights (decay `ema_decay`).
    `compute` sets the forward's precision, the layout and compilation (privbench.compute).

    Under torchrun every rank draws the same global batch (`generator` seeded alike) and trains on
    its 1/W share of the rows through DDP, which averages the gradients: a step is one process's step
    on the whole batch, at 1/W of the work per rank. `loss_fn`'s own draws (diffusion noise) should
    come from a stream per rank (privbench.dp.distributed.per_rank).
    """
    world = current_world()
    if batch_size % world.size:
        raise PrivbenchError(f"a batch of {batch_size} does not split evenly over {world.size} processes: "
                             f"set the pre-training batch_size to a multiple of {world.size}")
    device = next(model.parameters()).device
    lay_out(model, compute).train()
    forward = compiled(replicate(model), compute)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    on_device = [t.to(device) for t in tensors]  # once: no host copy per step
    n = len(tensors[0])
    for _ in tqdm(range(steps), desc="pre-train", disable=None if progress else True):
        index = torch.randint(n, (batch_size,), generator=generator)[world.rank :: world.size].to(device)
        plain_step(forward, optimizer, loss_fn, [in_layout(t[index], compute) for t in on_device], compute)
        ema.update_parameters(model)
    return model, ema.module.requires_grad_(False).eval()
