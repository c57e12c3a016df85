"""EDM preconditioning, loss, schedule and sampler; the conditional UNet; plain training."""

import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from privbench import data
from privbench.data.transforms import to_model, to_uint8
from privbench.diffusion import (
    EDMConfig,
    denoise,
    diffusion_loss_fn,
    edm_sampler,
    edm_variation,
    per_example_loss,
    precondition,
    sample_sigma,
    sigma_steps,
    train_plain,
)
from privbench.dp.sgd import per_sample_gradients
from privbench.nets.unet import build_unet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CFG = EDMConfig()
# (resolution, channels, classes, base, mult, layers per block, attention resolutions)
SMOKE = (28, 1, 10, 32, (1, 2), 1, (14,))
TINY = (28, 1, 10, 16, (1, 2), 1, (14,))  # the smoke shape at half the width, for the timed tests
PAPER = (32, 3, 10, 32, (2, 4), 2, (16,))  # PrivImage's CIFAR-10 UNet in DPImageBench: ~3.8M


def n_params(model):
    return sum(p.numel() for p in model.parameters())


class GaussianDenoiser(nn.Module):
    """F_theta of the ideal denoiser for data ~ N(0, s^2 I): D(x; sigma) = s^2 / (s^2 + sigma^2) x,
    turned into the raw network output by inverting Eq. 7's preconditioning."""

    unconditional_label = 0

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x_in, c_noise, labels):
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = precondition(sigma, CFG.sigma_data)
        x = x_in / c_in
        ideal = self.s**2 / (self.s**2 + sigma**2) * x
        return (ideal - c_skip * x) / c_out


def test_precondition_matches_table_1():
    sd = CFG.sigma_data
    for s in (0.01, 0.5, 3.0, 80.0):
        c_skip, c_out, c_in, c_noise = precondition(torch.tensor(s, dtype=torch.float64), sd)
        assert c_skip.item() == pytest.approx(sd**2 / (s**2 + sd**2))
        assert c_out.item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2))
        assert c_in.item() == pytest.approx(1 / math.sqrt(s**2 + sd**2))
        assert c_noise.item() == pytest.approx(math.log(s) / 4)
    # Vanishing noise: the denoiser passes its input through and the network's share vanishes.
    c_skip, c_out, _, _ = precondition(torch.tensor(1e-6, dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(1, abs=1e-9)
    assert c_out.item() == pytest.approx(0, abs=1e-5)


def test_sigma_schedule_endpoints_and_order():
    sigmas = sigma_steps(18, CFG)
    assert sigmas.shape == (19,)
    assert sigmas[0].item() == pytest.approx(CFG.sigma_max)
    assert sigmas[-2].item() == pytest.approx(CFG.sigma_min)
    assert sigmas[-1].item() == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    with pytest.raises(ValueError):
        sigma_steps(1, CFG)


def test_training_sigma_distribution():
    log_sigma = sample_sigma(20000, CFG, torch.Generator().manual_seed(0)).log()
    assert log_sigma.mean().item() == pytest.approx(CFG.p_mean, abs=0.05)
    assert log_sigma.std().item() == pytest.approx(CFG.p_std, abs=0.05)


def test_loss_of_perfect_and_zero_denoisers():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(y.shape, generator=g)
    labels = torch.zeros(3, dtype=torch.long)
    sigma = torch.tensor([0.1, 1.0, 10.0])

    class Oracle(nn.Module):
        # The F that makes D return the clean images exactly.
        def forward(self, x_in, c_noise, labels):
            s = (4 * c_noise).exp().view(-1, 1, 1, 1)
            c_skip, c_out, c_in, _ = precondition(s, CFG.sigma_data)
            return (y - c_skip * x_in / c_in) / c_out

    class Zero(nn.Module):
        def forward(self, x_in, c_noise, labels):
            return torch.zeros_like(x_in)

    perfect = per_example_loss(Oracle(), y, labels, sigma, noise, CFG)
    torch.testing.assert_close(perfect, torch.zeros(3), atol=1e-5, rtol=0)

    # F = 0 leaves D = c_skip (y + sigma n); the loss is lambda * mean (c_skip (y + sigma n) - y)^2.
    sd, s = CFG.sigma_data, sigma.view(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    expected = weight * ((c_skip * (y + s * noise) - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(per_example_loss(Zero(), y, labels, sigma, noise, CFG), expected)
    torch.testing.assert_close(denoise(Zero(), y, 1.0, labels, CFG), y * sd**2 / (1 + sd**2))


def test_sampler_reproduces_gaussian_data():
    # The ODE maps N(0, sigma_max^2) onto N(0, s^2). Heun's error on this narrow Gaussian is ~7% of
    # the std at 18 steps and ~2% at 32 (it falls as steps^-2); s = 0.25 keeps the final clamp to
    # [-1, 1] (4 s) from shrinking the std.
    s = 0.25
    labels = torch.zeros(4096, dtype=torch.long)
    x = edm_sampler(GaussianDenoiser(s), labels, (4096, 1, 4, 4), CFG, 32, torch.Generator().manual_seed(0))
    assert x.shape == (4096, 1, 4, 4)
    assert x.std().item() == pytest.approx(s, rel=0.05)
    assert abs(x.mean().item()) < 0.02


def test_sampler_is_deterministic_given_generator():
    net = GaussianDenoiser(0.3)
    labels = torch.zeros(8, dtype=torch.long)
    a = edm_sampler(net, labels, (8, 1, 4, 4), CFG, 6, torch.Generator().manual_seed(3))
    b = edm_sampler(net, labels, (8, 1, 4, 4), CFG, 6, torch.Generator().manual_seed(3))
    c = edm_sampler(net, labels, (8, 1, 4, 4), CFG, 6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_a_variation_from_the_first_noise_level_is_the_sampler_and_from_the_last_keeps_the_image():
    # The sampler's x_0 = sigma_max n is the variation of an all-zero image from level 0 (same draws).
    net, labels = GaussianDenoiser(0.3), torch.zeros(8, dtype=torch.long)
    sampled = edm_sampler(net, labels, (8, 1, 4, 4), CFG, 6, torch.Generator().manual_seed(3))
    varied = edm_variation(net, torch.zeros(8, 1, 4, 4), labels, CFG, 6, 0, torch.Generator().manual_seed(3))
    assert torch.equal(sampled, varied)
    # From the last level (sigma_min = 0.002) one Euler step returns D(y + 0.002 n) ~ y: the image
    # survives; from the middle the data's prior pulls it towards N(0, 0.3^2), so it moves.
    y = torch.rand(8, 1, 4, 4) * 1.6 - 0.8
    kept = edm_variation(net, y, labels, CFG, 6, 5, torch.Generator().manual_seed(0))
    moved = edm_variation(net, y, labels, CFG, 6, 2, torch.Generator().manual_seed(0))
    assert (kept - y).abs().max() < 0.01
    assert (moved - y).abs().mean() > 10 * (kept - y).abs().mean()
    with pytest.raises(ValueError, match="noise levels"):
        edm_variation(net, y, labels, CFG, 6, 6)


def test_guidance_mixes_conditional_and_unconditional():
    # A net that ignores labels: D_cond = D_uncond, so any guidance weight changes nothing, and the
    # guided calls pass the unconditional label alongside the real ones.
    seen = []

    class Recording(GaussianDenoiser):
        unconditional_label = 10

        def forward(self, x_in, c_noise, labels):
            seen.append(labels.clone())
            return super().forward(x_in, c_noise, labels)

    net, labels = Recording(0.3), torch.tensor([1, 2, 3])
    plain = edm_sampler(net, labels, (3, 1, 4, 4), CFG, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(l, labels) for l in seen) and len(seen) == 2 * 4 - 1
    seen.clear()
    guided = edm_sampler(net, labels, (3, 1, 4, 4), CFG, 4, torch.Generator().manual_seed(0), guidance=3.0)
    assert all(torch.equal(l, torch.tensor([1, 2, 3, 10, 10, 10])) for l in seen)
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=0)


def test_image_conversions_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    x = to_model(images)
    assert x.shape == (5, 3, 6, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), images)
    np.testing.assert_array_equal(to_uint8(torch.full((1, 1, 2, 2), 3.0)), np.full((1, 2, 2, 1), 255, np.uint8))


def test_unet_sizes_shape_and_validator():
    smoke, paper = build_unet(*SMOKE), build_unet(*PAPER)
    assert 1e5 <= n_params(smoke) <= 1e6
    assert n_params(paper) == pytest.approx(3.8e6, rel=0.10)
    assert ModuleValidator.validate(smoke, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in paper.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = smoke(x, torch.tensor([-1.0, 0.5]), torch.tensor([3, smoke.unconditional_label]))
    assert out.shape == x.shape
    with pytest.raises(ValueError):
        build_unet(30, 1, 10, 16, (1, 2, 2), 1, ())


def test_per_sample_gradients_with_multiplicity_and_label_dropout():
    torch.manual_seed(0)
    net = build_unet(*TINY)
    g = torch.Generator().manual_seed(0)
    batch = [torch.rand(2, 1, 28, 28, generator=g) * 2 - 1, torch.tensor([4, 7])]
    loss_fn = diffusion_loss_fn(CFG, torch.Generator().manual_seed(1), label_dropout=0.5)
    grads = per_sample_gradients(net, loss_fn, batch, mode="functorch", multiplicity=2)
    params = dict(net.named_parameters())
    assert grads.keys() == params.keys()
    for name, gs in grads.items():
        assert gs.shape == (2, *params[name].shape)
    # The two examples' gradients differ: each is its own (K-averaged) gradient, not a copy.
    assert not torch.allclose(grads["unet.conv_in.weight"][0], grads["unet.conv_in.weight"][1])


def test_loss_fn_draws_per_row_and_drops_labels():
    seen = []

    class Probe(GaussianDenoiser):
        unconditional_label = 10

        def forward(self, x_in, c_noise, labels):
            seen.append((c_noise, labels))
            return super().forward(x_in, c_noise, labels)

    y = torch.zeros(400, 1, 2, 2).repeat_interleave(2, dim=0)
    labels = torch.full((800,), 3)
    losses = diffusion_loss_fn(CFG, torch.Generator().manual_seed(0), label_dropout=0.25)(Probe(0.5), y, labels)
    c_noise, used = seen[0]
    assert losses.shape == (800,)
    assert c_noise.unique().numel() == 800  # repeated rows draw their own noise levels
    assert (used == 10).float().mean().item() == pytest.approx(0.25, abs=0.05)
    assert set(used.tolist()) == {3, 10}


def test_plain_training_lowers_the_loss():
    torch.manual_seed(0)
    net = build_unet(*TINY)
    mnist = data.load("mnist")
    images, labels = to_model(mnist.images[:64]), torch.as_tensor(mnist.labels[:64])
    g = torch.Generator().manual_seed(1)
    sigma, noise = sample_sigma(64, CFG, g), torch.randn(images.shape, generator=g)

    def fixed_loss(model):
        with torch.no_grad():
            return per_example_loss(model, images, labels, sigma, noise, CFG).mean().item()

    before = fixed_loss(net)
    net, ema = train_plain(
        net, diffusion_loss_fn(CFG, torch.Generator().manual_seed(2)), [images, labels],
        steps=12, batch_size=8, lr=2e-3, generator=torch.Generator().manual_seed(3), ema_decay=0.9,
    )  # fmt: skip
    assert fixed_loss(net) < 0.8 * before
    assert fixed_loss(ema) < 0.8 * before
    assert not any(p.requires_grad for p in ema.parameters())
