"""DP-SGD's per-sample gradients and clipping are exact on the paper UNet, in every grad-sample mode.

Issue 6 asks that per-sample clipping be "tested against the reference per-sample gradients to 1e-5
relative". Here the model is the `paper` preset's UNet (3.99M parameters at 32x32x3, 10 classes), the
loss is EDM's per-example denoising loss at fixed noise levels and noises, and the reference
per-example gradients come from torch.func (functional_call + vmap(grad) over single examples),
which shares nothing with Opacus' per-layer grad samplers; that reference is itself checked against
plain per-example backward passes.

What "exact to 1e-5 relative" means here, for vectors g (engine) and r (reference):

* per example: ||g_i - r_i|| <= 1e-5 ||r_i||, where g_i is example i's whole gradient, every
  parameter tensor flattened and concatenated: the vector DP-SGD clips as one;
* in float64 also per parameter tensor: ||g_ip - r_ip|| <= 1e-5 ||r_ip||, each tensor against its own
  reference norm (every reference tensor is checked to be nonzero first). This is the stronger
  condition (it implies the first) and names the layer that is wrong; a tensor whose gradient is
  tiny next to the whole, such as an attention query bias, cannot hide inside the total.

Most checks run in float64, so that 1e-5 tests the algorithm and not float32 rounding (measured:
below 1e-6 per example and per tensor). One test repeats the clipped sums in float32, the precision
training uses, against the float64 reference, with the per-example criterion only (measured ~1e-6;
single small tensors, e.g. attention query biases, reach ~4e-6 of their own norm in float32, too
close to 1e-5 to assert).

Everything runs on the `device` fixture's device (tests/conftest.py: cpu unless
$PRIVBENCH_TEST_DEVICE names another); the float32 test runs without TF32 (the `ieee_float32` fixture),
the float64 ones need nothing: TF32 never touches float64.

Clipping follows Opacus exactly: factor_i = min(1, C / (||g_i|| + 1e-6)). The 1e-6 is part of
Opacus' definition (DPOptimizer.clip_and_accumulate, GradSampleModuleFastGradientClipping
.get_clipping_coef), so the reference uses it too; it keeps ||factor_i g_i|| <= C.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from privbench.diffusion.edm import EDMConfig, per_example_loss, sample_sigma
from privbench.dp import sgd
from privbench.dp.sgd import per_sample_gradients
from privbench.methods import METHODS, presets
from privbench.nets.unet import build_unet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RTOL = 1e-5
EDM = EDMConfig()
EXAMPLES = 3
RESOLUTION, CHANNELS, CLASSES = 32, 3, 10
OPACUS_CLIP_EPS = 1e-6  # Opacus' stabiliser in factor = min(1, C / (norm + eps))


# ----------------------------------------------------------------------------- model and data


@pytest.fixture(scope="module")
def model32(device) -> nn.Module:
    """The `paper` preset's UNet (read from the diffusion methods' presets), float32, fixed seed, on `device`."""
    unet = presets(METHODS.get("privimage"))["paper"]["unet"]
    torch.manual_seed(0)
    return build_unet(
        RESOLUTION, CHANNELS, CLASSES, unet["base_channels"], tuple(unet["channel_mult"]),
        unet["layers_per_block"], tuple(unet["attention_resolutions"]),
    ).to(device)


@pytest.fixture(scope="module")
def model64(model32) -> nn.Module:
    """The same weights in float64 (the cast is exact)."""
    return copy.deepcopy(model32).double()


@dataclass(frozen=True)
class Draws:
    """A batch and the diffusion draws of each of its rows: row b * K + k is draw k of example b,
    the layout `sgd.per_example_backward` feeds `loss_fn` (each example repeated K times, consecutively)."""

    images: torch.Tensor  # [B, C, H, W]
    labels: torch.Tensor  # [B]
    sigma: torch.Tensor  # [B * K]
    noise: torch.Tensor  # [B * K, C, H, W]
    multiplicity: int

    def to(self, dtype: torch.dtype) -> Draws:
        cast = [t.to(dtype) for t in (self.images, self.sigma, self.noise)]
        return Draws(cast[0], self.labels, cast[1], cast[2], self.multiplicity)

    def on(self, device: torch.device) -> Draws:
        moved = [t.to(device) for t in (self.images, self.labels, self.sigma, self.noise)]
        return Draws(*moved, self.multiplicity)

    @property
    def batch(self) -> list[torch.Tensor]:
        return [self.images, self.labels]


def make_draws(multiplicity: int, device: torch.device) -> Draws:
    """Fixed images, labels (the unconditional label 10 included) and EDM training draws, in float32
    (so the float64 copies hold the very same numbers), drawn on the CPU (the same numbers whatever
    the device) and moved to `device`."""
    g = torch.Generator().manual_seed(1)
    rows = EXAMPLES * multiplicity
    images = torch.rand(EXAMPLES, CHANNELS, RESOLUTION, RESOLUTION, generator=g) * 2 - 1
    labels = torch.tensor([3, 7, CLASSES])
    sigma = sample_sigma(rows, EDM, g)
    noise = torch.randn(rows, CHANNELS, RESOLUTION, RESOLUTION, generator=g)
    return Draws(images, labels, sigma, noise, multiplicity).on(device)


def edm_loss(draws: Draws):
    """`loss_fn(model, images, labels)` for the DP engine: EDM's loss of each row at that row's fixed
    sigma and noise, so every row's loss is deterministic and K rows of an example differ."""

    def loss_fn(model, images, labels):
        assert len(images) == len(draws.sigma), "the engine must pass B * K rows"
        return per_example_loss(model, images, labels, draws.sigma, draws.noise, EDM)

    return loss_fn


# ----------------------------------------------------------------------------- references


def reference_gradients(model: nn.Module, draws: Draws) -> dict[str, torch.Tensor]:
    """Per-example gradients [B, *shape] by torch.func: vmap(grad) of one row's loss over all rows,
    then the mean over each example's K rows (the gradient of the example's mean loss)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    k = draws.multiplicity

    def row_loss(params, image, label, sigma, noise):
        net = lambda *args: functional_call(model, params, args)  # noqa: E731
        return per_example_loss(net, image[None], label[None], sigma[None], noise[None], EDM)[0]

    images, labels = (t.repeat_interleave(k, dim=0) for t in draws.batch)
    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0, 0, 0))(params, images, labels, draws.sigma, draws.noise)
    return {n: g.view(EXAMPLES, k, *g.shape[1:]).mean(1) for n, g in per_row.items()}


def loop_gradients(model: nn.Module, draws: Draws) -> dict[str, torch.Tensor]:
    """Per-example gradients [B, *shape] by the definition: one ordinary backward pass per example."""
    model = copy.deepcopy(model)
    k, out = draws.multiplicity, []
    for b in range(EXAMPLES):
        model.zero_grad(set_to_none=True)
        rows = slice(b * k, (b + 1) * k)
        image, label = (t[b : b + 1].repeat_interleave(k, dim=0) for t in draws.batch)
        per_example_loss(model, image, label, draws.sigma[rows], draws.noise[rows], EDM).mean().backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return {n: torch.stack([o[n] for o in out]) for n in out[0]}


@pytest.fixture(scope="module")
def reference(model64, device):
    """Float64 reference gradients per multiplicity, computed once per K on first use."""
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def get(multiplicity: int) -> dict[str, torch.Tensor]:
        if multiplicity not in cache:
            cache[multiplicity] = reference_gradients(model64, make_draws(multiplicity, device).to(torch.float64))
        return cache[multiplicity]

    return get


def norms_of(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    """||g_i|| [B] of the whole flattened gradient of each example."""
    return torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], dim=1).norm(dim=1)


def clip_between(norms: torch.Tensor) -> float:
    """A clip norm between the two smallest per-example norms: the smallest example passes
    unclipped, every other one is scaled down."""
    low = norms.sort().values
    return float((low[0] * low[1]).sqrt())


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """Opacus' per-example factor min(1, C / (||g_i|| + 1e-6))."""
    return (clip / (norms + OPACUS_CLIP_EPS)).clamp(max=1.0)


def clipped_sum(per_example: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """sum_i factor_i g_i per parameter: the sum DP-SGD adds its noise to."""
    factors = clip_factors(norms_of(per_example), clip)
    return {n: torch.einsum("i,i...->...", factors, g) for n, g in per_example.items()}


# ----------------------------------------------------------------------------- the engine


def engine_clipped_sum(
    model: nn.Module, draws: Draws, mode: str, clip: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The clipped sum and per-example norms as DP-SGD training computes them in `mode`.

    On a copy of `model`: `sgd.wrap_for_dp` and `sgd.per_example_backward` as in `train_dp_sgd`, with the optimizer
    class training uses for the mode and noise multiplier 0, then Opacus' `pre_step` (clip and
    accumulate, add the zero noise, scale). The clipped sum is `p.summed_grad`, the tensor
    `add_noise` adds noise to; in ghost mode (its second backward) and bookkeeping mode
    `per_example_backward` already leaves it in `p.grad`, which `pre_step` copies there. Norms are
    the grad samples' (functorch, hooks) or those the ghost or book-keeping module clipped with.
    """
    model = copy.deepcopy(model)
    wrapped, handles = sgd.wrap_for_dp(model, mode, clip)
    optimizer = sgd.optimizer_class(mode)(
        torch.optim.SGD(wrapped.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=EXAMPLES, loss_reduction="mean",
    )
    try:
        optimizer.zero_grad()
        sgd.per_example_backward(wrapped, optimizer, edm_loss(draws), draws.batch, draws.multiplicity, mode)
        if mode == "ghost":
            norms = wrapped.per_sample_gradient_norms.detach().clone()
        elif mode == "bookkeeping":
            norms = wrapped.per_sample_norms.detach().clone()
        else:
            norms = norms_of({n: p.grad_sample for n, p in model.named_parameters()})
        optimizer.pre_step()
        summed = {n: p.summed_grad.detach().clone() for n, p in model.named_parameters()}
    finally:
        wrapped.to_standard_module()
        for handle in handles:
            handle.remove()
    return summed, norms


# ----------------------------------------------------------------------------- comparisons


def relative_errors(engine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """||g_i - r_i|| / ||r_i|| per example, over the whole flattened gradient (float64)."""
    diff = {n: engine[n].double() - r for n, r in ref.items()}
    return norms_of(diff) / norms_of(ref)


def tensor_relative_errors(engine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """max_i ||g_ip - r_ip|| / ||r_ip|| per parameter tensor p, each against its own reference norm."""
    out = {}
    for n, r in ref.items():
        own = r.flatten(1).norm(dim=1)
        assert (own > 0).all(), f"reference gradient of {n} is zero for some example: no yardstick"
        out[n] = ((engine[n].double() - r).flatten(1).norm(dim=1) / own).max().item()
    return out


def assert_exact(engine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str, per_tensor: bool) -> None:
    """Per-sample gradients [B, ...] equal the reference to RTOL per example (and per tensor)."""
    assert engine.keys() == ref.keys(), f"{what}: parameters differ"
    errors = relative_errors(engine, ref)
    assert errors.max() <= RTOL, f"{what}: per-example relative errors {errors.tolist()}"
    if per_tensor:
        by_tensor = tensor_relative_errors(engine, ref)
        worst = max(by_tensor, key=by_tensor.get)
        assert by_tensor[worst] <= RTOL, f"{what}: {worst} off by {by_tensor[worst]:.3g} of its norm"


def batched(summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A summed gradient as a batch of one, to compare with the per-example helpers."""
    return {n: g[None] for n, g in summed.items()}


# ----------------------------------------------------------------------------- tests


def test_reference_is_per_example_backward(model64, reference, device):
    """The torch.func reference equals one ordinary backward pass per example (K = 2, so the
    averaging over draws is checked as well)."""
    draws = make_draws(2, device).to(torch.float64)
    assert_exact(reference(2), loop_gradients(model64, draws), "vmap vs loop", per_tensor=True)


@pytest.mark.parametrize("multiplicity", [1, 2])
@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_per_sample_gradients_are_exact(model64, reference, device, mode, multiplicity):
    """`per_sample_gradients` (the training path's wrapping, K folding and consistency check) returns
    every example's gradient of its mean row loss, per tensor, to 1e-5 in float64."""
    draws = make_draws(multiplicity, device).to(torch.float64)
    engine = per_sample_gradients(model64, edm_loss(draws), draws.batch, mode, multiplicity)
    assert_exact(engine, reference(multiplicity), f"{mode}, K={multiplicity}", per_tensor=True)


@pytest.mark.parametrize("mode, multiplicity", [
    ("functorch", 1), ("hooks", 1), ("ghost", 1), ("bookkeeping", 1), ("functorch", 2), ("hooks", 2), ("bookkeeping", 2),
])
def test_clipped_sum_is_exact(model64, reference, device, mode, multiplicity):
    """The sum DP-SGD noises, sum_i min(1, C / (||g_i|| + 1e-6)) g_i with C binding for some examples
    and not others, and the norms it clipped with, equal the reference's to 1e-5 in float64.
    Ghost and book-keeping clipping never form every g_i, so this is the only exactness check they have."""
    ref = reference(multiplicity)
    ref_norms = norms_of(ref)
    clip = clip_between(ref_norms)
    factors = clip_factors(ref_norms, clip)
    assert (factors == 1).any() and (factors < 0.99).any(), f"clip {clip} must bind for some examples only"

    summed, norms = engine_clipped_sum(model64, make_draws(multiplicity, device).to(torch.float64), mode, clip)
    norm_errors = (norms.double() - ref_norms).abs() / ref_norms
    assert norm_errors.max() <= RTOL, f"{mode}: per-example norms off by {norm_errors.tolist()}"
    what = f"{mode}, K={multiplicity}, clipped sum"
    assert_exact(batched(summed), batched(clipped_sum(ref, clip)), what, per_tensor=True)


@pytest.mark.parametrize("mode", ["functorch", "hooks", "ghost", "bookkeeping"])
def test_clipped_sum_is_exact_in_float32(model32, reference, device, ieee_float32, mode):
    """Training precision: the float32 engine's clipped sum and norms against the float64 reference
    of the same weights and draws, to 1e-5 over the whole gradient vector."""
    ref = reference(1)
    ref_norms = norms_of(ref)
    clip = clip_between(ref_norms)
    summed, norms = engine_clipped_sum(model32, make_draws(1, device), mode, clip)
    assert all(g.dtype == torch.float32 for g in summed.values())
    norm_errors = (norms.double() - ref_norms).abs() / ref_norms
    assert norm_errors.max() <= RTOL, f"{mode}: per-example norms off by {norm_errors.tolist()}"
    assert_exact(batched(summed), batched(clipped_sum(ref, clip)), f"{mode}, float32 clipped sum", per_tensor=False)
