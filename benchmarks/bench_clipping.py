"""DP-SGD's per-example clipping on CPU, in each grad-sample mode (Opacus' three and book-keeping).

One timed call is the work of one physical batch in `train_dp_sgd` short of the parameter update:
`sgd.per_example_backward` (per-sample gradients, ghost clipping's two backward passes, or book-keeping's one) and the optimizer's
`pre_step` (norms, clip, sum, zero noise, scale). The model is wrapped once, outside the timer, as
training does. After timing, the clipped sum the optimizer holds is checked against torch.func's
reference to 1e-4 relative (float32), so a fast but wrong mode fails instead of winning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from privbench.diffusion.edm import EDMConfig, per_example_loss, sample_sigma
from privbench.dp import sgd
from privbench.methods import METHODS, presets
from privbench.nets.unet import build_unet

RTOL = 1e-4  # float32 sums of a few dozen clipped gradients; a wrong mode is off by O(1)
EDM = EDMConfig()


@dataclass
class Workload:
    """A model, a batch, and a per-example loss `loss_fn(model, *batch) -> [B]` with fixed randomness."""

    model: nn.Module
    batch: list[torch.Tensor]
    loss_fn: object


def convnet() -> Workload:
    """A small CIFAR-shaped classifier (GroupNorm, as DP-SGD needs), 32 images, cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(32, 3, 32, 32, generator=g), torch.randint(10, (32,), generator=g)]
    return Workload(model, batch, lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"))


def unet(preset: str, resolution: int, channels: int, examples: int) -> Workload:
    """The diffusion methods' UNet of `preset`, EDM's loss at fixed training draws."""
    u = presets(METHODS.get("privimage"))[preset]["unet"]
    torch.manual_seed(0)
    model = build_unet(resolution, channels, 10, u["base_channels"], tuple(u["channel_mult"]),
                       u["layers_per_block"], tuple(u["attention_resolutions"]))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(examples, channels, resolution, resolution, generator=g) * 2 - 1
    labels = torch.randint(11, (examples,), generator=g)
    sigma, noise = sample_sigma(examples, EDM, g), torch.randn(images.shape, generator=g)
    # The draws travel with the batch, so a single example (torch.func's reference) carries its own.
    batch = [images, labels, sigma, noise]
    return Workload(model, batch, lambda m, x, y, s, n: per_example_loss(m, x, y, s, n, EDM))


WORKLOADS = {
    "convnet-b32": convnet,
    "smoke-unet-b16": lambda: unet("smoke", 28, 1, 16),
    "paper-unet-b4": lambda: unet("paper", 32, 3, 4),
}


def reference_gradients(work: Workload) -> dict[str, torch.Tensor]:
    """Per-example gradients [B, ...] by torch.func: vmap(grad) of one example's loss."""
    params = {n: p.detach() for n, p in work.model.named_parameters()}

    def one(params, *example):
        net = lambda *args: functional_call(work.model, params, args)  # noqa: E731
        return work.loss_fn(net, *(t[None] for t in example))[0]

    return vmap(grad(one), in_dims=(None, *[0] * len(work.batch)))(params, *work.batch)


def clipped_sum(per_example: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Opacus' clipped sum: sum_i min(1, C / (||g_i|| + 1e-6)) g_i, per parameter."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], 1).norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", factors, g) for n, g in per_example.items()}


@pytest.fixture(scope="module")
def workloads():
    """Each workload with its clip norm (the median per-example norm: clipping binds for about half
    the batch) and its reference clipped sum, built once per module on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            work = WORKLOADS[name]()
            ref = reference_gradients(work)
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in ref.values()], 1).norm(dim=1)
            clip = float(norms.median())
            cache[name] = work, clip, clipped_sum(ref, clip)
        return cache[name]

    return get


@pytest.mark.parametrize("mode", sgd.GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_clip_physical_batch(benchmark, workloads, workload, mode):
    work, clip, expected = workloads(workload)
    model = copy.deepcopy(work.model)
    wrapped, handles = sgd.wrap_for_dp(model, mode, clip)
    optimizer_cls = sgd.optimizer_class(mode)
    optimizer = optimizer_cls(
        torch.optim.SGD(wrapped.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=len(work.batch[0]), loss_reduction="mean",
    )

    def step():
        optimizer.zero_grad()
        sgd.per_example_backward(wrapped, optimizer, work.loss_fn, work.batch, 1, mode)
        optimizer.pre_step()

    benchmark.group = f"clipping {workload}"
    try:
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
        got = {n: p.summed_grad for n, p in model.named_parameters()}
    finally:
        wrapped.to_standard_module()
        for handle in handles:
            handle.remove()
    error = torch.stack([(got[n] - e).norm() for n, e in expected.items()]).norm()
    scale = torch.stack([e.norm() for e in expected.values()]).norm()
    benchmark.extra_info["relative_error"] = float(error / scale)
    assert error <= RTOL * scale, f"{mode}: clipped sum off by {float(error / scale):.3g} relative"
