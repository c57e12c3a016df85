"""Book-keeping clipping (privbench.dp.bookkeeping): what the exactness tests on the paper UNet
(tests/test_clipping_exact.py) do not cover: the sensitivity bound under bf16 autocast, noise
multiplicity through the training engine, layers it cannot handle, layers a forward pass skips."""

import math

import pytest
import torch
from torch import nn

from privbench.compute import ComputeConfig, autocast
from privbench.context import RunContext
from privbench.dp import PrivacyLedger
from privbench.dp.bookkeeping import BookKeeping
from privbench.dp.sgd import train_dp_sgd
from privbench.errors import PrivbenchError
from privbench.nets.unet import build_unet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_example_contributes_at_most_the_clip_norm(precision):
    """One example per batch, gradients far above C: the clipped sum is that example's contribution,
    and its norm is C (not more), in fp32 and under bf16 autocast alike."""
    torch.manual_seed(0)
    net = build_unet(16, 1, 10, 8, (1, 2), 1, (8,))
    clip = 1e-3
    wrapped = BookKeeping(net, clip)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 1, 16, 16, generator=g)
        with autocast(torch.device("cpu"), ComputeConfig(precision=precision)):
            out = wrapped(x, torch.rand(1, generator=g), torch.tensor([seed]))
            loss = (out.float() - 5).square().sum(dim=(1, 2, 3))
        norms = wrapped.clipped_backward(loss)
        assert norms.item() > 100 * clip
        assert flat_grad(net).norm().item() == pytest.approx(clip, rel=1e-5)
        assert flat_grad(net).norm().item() <= clip * (1 + 1e-6)


def test_training_with_multiplicity_matches_functorch():
    """The engine's DP-SGD with K = 3 rows per example, clipping binding and noise on, follows the
    same trajectory in bookkeeping mode as in functorch mode (Opacus' per-sample gradients)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randn(24, generator=g)

    def noisy_mse(generator):
        def loss_fn(model, xr, yr):  # each row its own input noise: K rows of an example differ
            return (model(xr + 0.3 * torch.randn(xr.shape, generator=generator)).squeeze(1) - yr) ** 2
        return loss_fn

    def run(mode, tmp):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Tanh(), nn.Linear(8, 1))
        ctx = RunContext(tmp, tmp, torch.device("cpu"), seed=5, progress=False)
        result = train_dp_sgd(model, noisy_mse(torch.Generator().manual_seed(2)), [x, y], PrivacyLedger(4.0, 1e-5, "rdp"),
                              ctx, logical_batch=24, physical_batch=7, steps=4, clip_norm=0.05, lr=0.1,
                              optimizer="sgd", multiplicity=3, grad_sample_mode=mode)
        return torch.cat([p.detach().flatten() for p in result.model.parameters()]), result.mechanism

    (bk, bk_mechanism), (reference, mechanism) = run("bookkeeping", "/tmp"), run("functorch", "/tmp")
    assert bk_mechanism.noise_multiplier == mechanism.noise_multiplier > 0
    torch.testing.assert_close(bk, reference, rtol=0, atol=1e-6)


def test_refuses_layers_it_cannot_clip():
    with pytest.raises(PrivbenchError, match="does not support LayerNorm; use grad_sample_mode=functorch"):
        BookKeeping(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), 1.0)
    with pytest.raises(PrivbenchError, match="groups=2"):
        BookKeeping(nn.Conv2d(2, 2, 3, groups=2), 1.0)
    frozen = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3).requires_grad_(False))
    BookKeeping(frozen, 1.0)  # a frozen layer needs no clipping


def test_refuses_a_layer_run_twice():
    layer = nn.Linear(3, 3)
    wrapped = BookKeeping(nn.Sequential(layer, nn.Tanh(), layer), 1.0)
    loss = wrapped(torch.randn(2, 3)).sum(1)
    with pytest.raises(PrivbenchError, match="each layer to run once per forward pass"):
        wrapped.clipped_backward(loss)


def test_layers_the_forward_skips_get_zero_gradients():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.skipped, self.unused_output = nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x):
            self.unused_output(x)  # runs, but the loss does not depend on it
            return self.used(x)

    net = Branchy()
    wrapped = BookKeeping(net, 1.0)
    norms = wrapped.clipped_backward(wrapped(torch.randn(4, 3)).squeeze(1))
    assert torch.isfinite(norms).all() and (norms > 0).all()
    for layer in (net.skipped, net.unused_output):
        assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    assert net.used.weight.grad.any()
    assert math.isclose(flat_grad(net).norm().item(), flat_grad(net.used).norm().item())
