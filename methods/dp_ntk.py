"""DP-NTK: differentially private neural tangent kernels for data generation (Yang, Adamczewski,
Sutherland, Li and Park, AISTATS 2023).

DP-MERF's recipe with other features: phi(x) is the gradient, with respect to the parameters of a
small randomly initialised network that is never trained, of the sum of its outputs at x, scaled to
norm 1 (the normalised empirical neural tangent kernel). One release of the class-conditional mean
embedding (methods.mean_embedding, which argues the sensitivity), then a generator trained to match
it, back-propagating through the tangent features of its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from privbench.checks import POSITIVE_INT, Rule, each
from privbench.context import RunContext, Task
from privbench.dp import PrivacyLedger
from privbench.methods import METHODS
from privbench.methods import mean_embedding


@dataclass(frozen=True)
class DPNTKConfig(mean_embedding.GeneratorConfig):
    ntk_widths: tuple[int, ...]  # hidden widths of the tangent network
    ntk_outputs: int  # its output units (their sum is differentiated)
    steps: int
    lr_decay: float  # multiplies the learning rate every `decay_every` steps
    decay_every: int

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "ntk_widths": each(POSITIVE_INT), "ntk_outputs": POSITIVE_INT, "steps": POSITIVE_INT,
                "lr_decay": mean_embedding.LR_DECAY, "decay_every": POSITIVE_INT}


def tangent_network(n_pixels: int, widths: tuple[int, ...], outputs: int) -> nn.Sequential:
    """DPImageBench's fc_1l ([w]: linear, ReLU, LayerNorm, linear) and fc_2l ([w1, w2]: linear, ReLU,
    linear, LayerNorm, linear): a ReLU after the first layer, a LayerNorm without affine parameters
    before the output layer."""
    layers: list[nn.Module] = [nn.Linear(n_pixels, widths[0]), nn.ReLU()]
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(w_in, w_out))
    layers += [nn.LayerNorm(widths[-1], elementwise_affine=False), nn.Linear(widths[-1], outputs)]
    return nn.Sequential(*layers)


class TangentFeatures:
    """phi(x) = g(x) / ||g(x)|| with g(x) = d/d theta sum_k f_k(x; theta) at the network's fixed weights.

    Only linear layers carry parameters, so per image g is, layer by layer, delta (x) a for the weight
    and delta for the bias, where a is the layer's input and delta the derivative of the output sum
    with respect to the layer's output: ||g||^2 = sum_l ||delta_l||^2 (||a_l||^2 + 1). The embedding
    is then a weighted sum of outer products, one matrix product per layer, and no image's gradient
    is ever held whole (a batch of them is B x dim floats). The output layer's bias gradient is all
    ones, so ||g(x)|| >= sqrt(outputs) > 0.
    """

    def __init__(self, network: nn.Module):
        self.network = network.requires_grad_(True)
        self.linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
        self.dim = sum(p.numel() for p in network.parameters())

    def embed(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        inputs, outputs = [], []

        def keep(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inputs.append(args[0])
            outputs.append(output)

        hooks = [m.register_forward_hook(keep) for m in self.linears]
        try:
            total = self.network(x).sum()
        finally:
            for hook in hooks:
                hook.remove()
        deltas = torch.autograd.grad(total, outputs, create_graph=x.requires_grad)
        norms = sum(d.square().sum(1) * (a.square().sum(1) + 1) for a, d in zip(inputs, deltas)).sqrt()
        scaled = weights / norms[:, None]
        blocks = []
        for a, d in zip(inputs, deltas):  # named_parameters' order: each layer's weight [out, in], then bias
            blocks += [torch.einsum("bo,bc,bi->oic", d, scaled, a).reshape(-1, weights.shape[1]), d.T @ scaled]
        return torch.cat(blocks)


@METHODS.register("dp-ntk")
class DPNTK(mean_embedding.MeanEmbeddingMethod):
    name = "dp-ntk"
    Config = DPNTKConfig

    def _fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> mean_embedding.GeneratorSynthesizer:
        c, n_classes = self.config, len(task.classes)
        # The network's weights do not depend on the data: drawing them costs no privacy.
        torch.manual_seed(ctx.stage_seed("ntk-init"))
        phi = TangentFeatures(tangent_network(task.resolution**2 * task.channels, c.ntk_widths, c.ntk_outputs).to(ctx.device))
        target, counts = mean_embedding.release_embedding("ntk-embedding", task.members, phi, n_classes, ledger, ctx)
        proportions = mean_embedding.class_proportions(counts)
        generator = self._train(task, ctx, phi, lambda step: (target, proportions), torch.optim.Adam, steps=c.steps,
                                decay_every=c.decay_every, lr_decay=c.lr_decay)
        return self._synthesizer(generator, proportions, task)
