"""Book-keeping clipping (privbench.dp.bookkeeping): what the exactness tests on the paper UNet
(tests/test_clipping_exact.py) do not cover: the sensitivity bound under bf16 autocast, noise
multiplicity through the training engine, layers it cannot handle, layers a forward pass skips, and
tied weights (in every grad-sample mode, against torch.func).

The clip bound, the trajectory and the tied weights run on the `device` fixture's device (tests/conftest.py),
under PyTorch's default arithmetic there, as training runs: on CUDA, cuDNN's convolutions may use TF32,
and the bound must hold for what training computes."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from privbench.compute import ComputeConfig, autocast
from privbench.context import RunContext
from privbench.dp import PrivacyLedger
from privbench.dp import sgd
from privbench.dp.bookkeeping import BookKeeping
from privbench.dp.sgd import train_dp_sgd
from privbench.errors import PrivbenchError
from privbench.nets.unet import build_unet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_example_contributes_at_most_the_clip_norm(precision, device):
    """One example per batch, gradients far above C: the clipped sum is that example's contribution,
    and its norm is C (not more), in fp32 and under bf16 autocast alike."""
    torch.manual_seed(0)
    net = build_unet(16, 1, 10, 8, (1, 2), 1, (8,)).to(device)
    clip = 1e-3
    wrapped = BookKeeping(net, clip)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, sigma = torch.randn(1, 1, 16, 16, generator=g).to(device), torch.rand(1, generator=g).to(device)
        with autocast(device, ComputeConfig(precision=precision)):
            out = wrapped(x, sigma, torch.tensor([seed], device=device))
            loss = (out.float() - 5).square().sum(dim=(1, 2, 3))
        norms = wrapped.clipped_backward(loss)
        assert norms.item() > 100 * clip
        assert flat_grad(net).norm().item() == pytest.approx(clip, rel=1e-5)
        assert flat_grad(net).norm().item() <= clip * (1 + 1e-6)


def test_training_with_multiplicity_matches_functorch(device):
    """The engine's DP-SGD with K = 3 rows per example, clipping binding and noise on, follows the
    same trajectory in bookkeeping mode as in functorch mode (Opacus' per-sample gradients)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randn(24, generator=g)

    def noisy_mse(generator):
        def loss_fn(model, xr, yr):  # each row its own input noise (drawn on the CPU): K rows of an example differ
            return (model(xr + 0.3 * torch.randn(xr.shape, generator=generator).to(xr.device)).squeeze(1) - yr) ** 2
        return loss_fn

    def run(mode, tmp):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Tanh(), nn.Linear(8, 1))
        ctx = RunContext(tmp, tmp, device, seed=5, progress=False)
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


class TiedWeights(nn.Module):
    """An embedding tied to the output layer, and two layers sharing one weight (distinct biases);
    wide enough, for 3 tokens, that book-keeping would take the ghost norm of every linear weight."""

    def __init__(self):
        super().__init__()
        self.embed, self.first, self.second = nn.Embedding(6, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 6, bias=False)
        self.second.weight, self.out.weight = self.first.weight, self.embed.weight

    def forward(self, tokens):  # [B, T] -> logits [B, 6]
        return self.out(torch.tanh(self.second(torch.tanh(self.first(self.embed(tokens)))))).mean(1)


def tied_loss(model, tokens, labels):
    return nn.functional.cross_entropy(model(tokens), labels, reduction="none")


def torch_func_clipped_sum(model, batch, clip):
    """Per-example norms and sum_b min(1, C / (||g_b|| + 1e-6)) g_b, g_b by torch.func: the gradient of
    example b's loss with respect to each parameter once, however many modules hold it."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(params, tokens, label):
        return tied_loss(lambda x: functional_call(model, params, (x,)), tokens[None], label[None])[0]

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, *batch)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], 1).norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, {n: torch.einsum("b,b...->...", factors, g) for n, g in per_example.items()}


@pytest.mark.parametrize("mode", ["bookkeeping", "functorch", "hooks"])
def test_tied_weights_are_clipped_exactly(mode, device):
    """A tied parameter's per-example gradient is the sum over its modules, cross terms included, in
    the norm and in the clipped sum DP-SGD noises (float64, to 1e-5 relative, clipping binding for
    some examples only)."""
    torch.manual_seed(0)
    model = TiedWeights().double().to(device)
    g = torch.Generator().manual_seed(1)
    batch = tuple(t.to(device) for t in (torch.randint(6, (5, 3), generator=g), torch.randint(6, (5,), generator=g)))
    clip = 8.0
    reference_norms, reference = torch_func_clipped_sum(model, batch, clip)
    assert (reference_norms < clip - 1).any() and (reference_norms > clip + 1).any()

    wrapped, handles = sgd.wrap_for_dp(model, mode, clip)
    optimizer = sgd.optimizer_class(mode)(torch.optim.SGD(wrapped.parameters(), lr=0.0), noise_multiplier=0.0,
                                          max_grad_norm=clip, expected_batch_size=5, loss_reduction="mean")
    sgd.per_example_backward(wrapped, optimizer, tied_loss, batch, 1, mode)
    norms = (wrapped.per_sample_norms if mode == "bookkeeping"
             else torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in model.parameters()], 1).norm(dim=1))
    optimizer.pre_step()
    torch.testing.assert_close(norms, reference_norms, rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.summed_grad, reference[name], rtol=1e-5, atol=1e-12, msg=name)
    for handle in handles:
        handle.remove()


def test_ghost_clipping_refuses_tied_weights_when_wrapping():
    with pytest.raises(PrivbenchError) as refused:
        sgd.wrap_for_dp(TiedWeights(), "ghost", 1.0)
    assert str(refused.value) == ("ghost clipping cannot clip parameters shared between modules (embed.weight is "
                                  "out.weight; first.weight is second.weight); use grad_sample_mode=bookkeeping or functorch")
