"""Book-keeping per-example clipping: per-example norms and the clipped sum from one backward pass.

Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model at Small Cost", ICML 2023
(BK). A layer with input a and output s = f(a; W) has, for example b, the weight gradient
sum_t a_bt g_bt^T over its positions t (pixels, tokens, and here also the K rows of the example under
noise multiplicity), where g = dL/ds is the layer's output gradient. So:

1. one backward pass computes only the output gradients g of the trainable layers (every weight
   gradient is pruned from autograd's graph: nothing here reads p.grad);
2. each layer's per-example squared norms come from (a, g), by whichever is cheaper (mixed ghost
   clipping, Bu et al. 2022, "Scalable and Efficient Training of Large Convolutional Neural Networks
   with Differential Privacy", NeurIPS):
   - ghost norm (Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
     Learners"): ||A_b^T G_b||_F^2 = <A_b A_b^T, G_b G_b^T>, cost ~ T^2 (d + p) per example;
   - the per-example gradient A_b^T G_b itself, cost ~ T d p (for a convolution, one weight-gradient
     convolution with the examples as groups);
3. the clip factors c_b = min(1, C / (||grad_b|| + 1e-6)) (Opacus' definition) give the clipped sum:
   sum_b c_b grad_b from the per-example gradients where they were formed (a [B, *param] reduction),
   and elsewhere one ordinary weight-gradient product with g scaled by c per example:
   sum_b c_b A_b^T G_b = A^T (c * G).

Against Opacus' modes: the backward pass computes no weight gradient that is then thrown away
(hooks and functorch compute both the batch gradient and the per-sample ones), there is no second
backward pass (ghost clipping), and an example's K rows are clipped as one (ghost clipping cannot).
The per-example gradients formed in step 2 are kept until step 3, as hooks mode keeps them. Norms
and sums are computed in float32 (float64 for float64 models) from the very activations and output
gradients the forward and backward produced, so the sum that is noised is clipped with the norms of
exactly its own terms, also under bf16 autocast.

Supported trainable layers: Linear, Conv2d (zero padding, groups 1), GroupNorm, Embedding; each may
run once per forward pass. Anything else with parameters is refused when wrapping. A parameter that
several layers hold (tied weights, e.g. an embedding and the output layer) has, per example, the sum of
its gradients through each of them: its per-example gradients are formed in every layer holding it
(never the ghost norm, which would lose the cross terms between layers), summed, and only then enter
the norm and the clipped sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from privbench.errors import PrivbenchError

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.Embedding)
CLIP_EPS = 1e-6  # Opacus' stabiliser in min(1, C / (norm + eps)): keeps ||c_b grad_b|| <= C


class _Capture(torch.autograd.Function):
    """Identity on a layer's output whose backward files the output gradient into `record`.

    The second input is a scalar leaf that every capture shares: asking autograd for the gradient
    of that leaf alone makes it run exactly the nodes between the loss and the captures (the
    activation gradients), and none of the weight gradients.
    """

    @staticmethod
    def forward(ctx, output, anchor, record):
        ctx.record, ctx.anchor = record, (anchor.dtype, anchor.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.record.grad_output = grad
        dtype, device = ctx.anchor
        return grad, torch.zeros((), dtype=dtype, device=device), None


@dataclass
class _Record:
    module: nn.Module
    input: torch.Tensor
    grad_output: torch.Tensor | None = None


@dataclass
class _Layer:
    """One layer's share of the per-example squared norm, and what the clipped sum needs."""

    squared_norms: torch.Tensor  # [B], of its parameters' gradients but the tied ones' (those enter summed)
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)  # parameters' gradients: [B, *shape]
    ghost: bool = False  # the weight's norm is the ghost norm; its clipped sum is formed from a and g


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """The trainable parameters that several modules hold (tied weights), each as the qualified
    names it has in them, e.g. ["embed.weight", "out.weight"]."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                holders.setdefault(id(param), []).append(f"{module_name}.{name}" if module_name else name)
    return [names for names in holders.values() if len(names) > 1]


class BookKeeping(nn.Module):
    """`model` with book-keeping clipping: `clipped_backward(per_example_losses)` leaves in each
    trainable parameter's `.grad` the sum over examples of its clipped gradient, ready for Opacus'
    DPOptimizerFastGradientClipping (which adds the noise and scales)."""

    def __init__(self, model: nn.Module, max_grad_norm: float):
        super().__init__()
        self._module = model
        self.max_grad_norm = max_grad_norm
        self.per_sample_norms: torch.Tensor | None = None
        layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        unsupported = sorted({type(m).__name__ for m in layers if not isinstance(m, SUPPORTED)})
        for m in layers:
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                unsupported.append(f"Conv2d(groups={m.groups}, padding={m.padding!r}, padding_mode={m.padding_mode!r})")
        if unsupported:
            raise PrivbenchError(
                f"book-keeping clipping does not support {', '.join(unsupported)}; use grad_sample_mode=functorch"
            )
        # Tied weights: their per-example gradients are formed in each holder and summed.
        self._shared = {id(model.get_parameter(names[0])) for names in shared_parameters(model)}
        self._records: list[_Record] = []
        self._anchor: torch.Tensor | None = None
        self.hooks_enabled = True
        self._handles = [m.register_forward_hook(self._capture) for m in layers]

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def to_standard_module(self) -> nn.Module:
        """Remove the hooks; the model as it was (Opacus' wrappers' name for it)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._records = [], []
        return self._module

    def disable_hooks(self) -> None:
        """Stop recording forward passes (Opacus' wrappers' name): they then never reach a clipped sum."""
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def _capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled() or not self.hooks_enabled:
            return None
        if self._anchor is None:
            self._anchor = torch.zeros((), device=output.device, requires_grad=True)
        record = _Record(module, args[0].detach())
        self._records.append(record)
        return _Capture.apply(output, self._anchor, record)

    def clipped_backward(self, per_example_losses: torch.Tensor) -> torch.Tensor:
        """Backward of sum_b loss_b; every parameter's `.grad` becomes sum_b c_b grad_b. Returns the
        per-example norms ||grad_b|| [B] (also kept in `per_sample_norms`)."""
        records, anchor = self._records, self._anchor
        self._records, self._anchor = [], None
        modules = [r.module for r in records]
        if len(set(map(id, modules))) != len(modules):
            raise PrivbenchError("book-keeping clipping needs each layer to run once per forward pass; "
                                 "use grad_sample_mode=functorch")
        torch.autograd.grad(per_example_losses.sum(), anchor, allow_unused=True)
        examples = len(per_example_losses)
        layers = [_norms(r.module, r.input, r.grad_output, examples, self._shared) for r in records]
        per_example = _per_parameter(records, layers)
        tied = [grads.flatten(1).square().sum(1) for key, (_, grads) in per_example.items() if key in self._shared]
        norms = torch.stack([layer.squared_norms for layer in layers] + tied).sum(0).sqrt()
        factors = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        for param, grads in per_example.values():
            param.grad = torch.einsum("b,b...->...", factors, grads).to(param.dtype)
        summed = set(per_example)
        for record, layer in zip(records, layers):
            if layer.ghost:
                _ghost_clipped_sum(record.module, record.input, record.grad_output, factors)
                summed.add(id(record.module.weight))
        # Parameters of layers this forward did not run, or whose output the loss ignores: zero.
        for param in self._module.parameters():
            if param.requires_grad and id(param) not in summed:
                param.grad = torch.zeros_like(param)
        self.per_sample_norms = norms
        return norms


def _per_parameter(records: list[_Record], layers: list[_Layer]) -> dict[int, tuple[nn.Parameter, torch.Tensor]]:
    """Each parameter's per-example gradients [B, *shape], summed over the layers holding it (by id)."""
    summed: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for record, layer in zip(records, layers):
        for name, grads in layer.per_example.items():
            param = getattr(record.module, name)
            summed[id(param)] = (param, summed[id(param)][1] + grads if id(param) in summed else grads)
    return summed


def _dtype(module: nn.Module) -> torch.dtype:
    return torch.promote_types(next(module.parameters()).dtype, torch.float32)


def _grouped(t: torch.Tensor, examples: int) -> torch.Tensor:
    """[B * K, ..., c] rows -> [B, K * positions, c]: an example's rows and positions as one axis."""
    return t.reshape(examples, -1, t.shape[-1])


def _columns(t: torch.Tensor, examples: int) -> torch.Tensor:
    """[B * K, c, T] rows -> [B, c, K * T]: an example's rows and positions as one axis of columns."""
    rows, c, positions = t.shape
    if rows == examples:
        return t
    return t.view(examples, rows // examples, c, positions).transpose(1, 2).reshape(examples, c, -1)


def _row_factors(factors: torch.Tensor, rows: int, dims: int) -> torch.Tensor:
    """The factor of each row's example, shaped to broadcast over a [rows, ...] tensor of `dims` dims."""
    return factors.repeat_interleave(rows // len(factors)).view(rows, *([1] * (dims - 1)))


def _ghost_is_cheaper(columns: int, d: int, p: int) -> bool:
    """Ghost norm ~ columns^2 (d + p) against forming the gradient ~ columns d p, per example."""
    return columns * (d + p) < d * p


def _conv_weight_gradients(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, examples: int) -> torch.Tensor:
    """Per-example weight gradients [B, *weight.shape] of a convolution: one weight-gradient
    convolution with the examples as groups, whose batch axis (summed over) is each example's K rows."""
    k = len(a) // examples

    def grouped(t):  # [B * K, c, H, W] -> [K, B * c, H, W]
        return t.view(examples, k, *t.shape[1:]).transpose(0, 1).reshape(k, -1, *t.shape[2:])

    p, d = module.weight.shape[:2]
    gradients = torch.nn.grad.conv2d_weight(grouped(a), (examples * p, *module.weight.shape[1:]), grouped(g),
                                            module.stride, module.padding, module.dilation, groups=examples)
    return gradients.view(examples, p, d, *module.weight.shape[2:])


def _weight_gradients(
    a: torch.Tensor, g: torch.Tensor, examples: int, ghost: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example ||sum_rows G A^T||_F^2 for rows a [B * K, d, T] and g [B * K, p, T], and the
    per-example gradients [B, p, d] themselves unless `ghost` allows the ghost norm over the example's
    K * T columns and it is the cheaper route (then None)."""
    rows, d, positions = a.shape
    p, k = g.shape[1], rows // examples
    if ghost and _ghost_is_cheaper(k * positions, d, p):
        a, g = _columns(a, examples), _columns(g, examples)
        gram_a, gram_g = torch.bmm(a.transpose(1, 2), a), torch.bmm(g.transpose(1, 2), g)
        return (gram_a * gram_g).sum((1, 2)), None
    # An example's K rows accumulate into one gradient, from strided views of the rows (no copy).
    a_rows, g_rows = a.view(examples, k, d, positions), g.view(examples, k, p, positions)
    gradients = torch.bmm(g_rows[:, 0], a_rows[:, 0].transpose(1, 2))
    for j in range(1, k):
        gradients.baddbmm_(g_rows[:, j], a_rows[:, j].transpose(1, 2))
    return gradients.square().sum((1, 2)), gradients


def _norms(module: nn.Module, a: torch.Tensor, g: torch.Tensor | None, examples: int, tied: set[int]) -> _Layer:
    """The layer's per-example squared gradient norms, and the per-example gradients that were formed
    on the way (kept for the clipped sum, as Opacus' hooks mode keeps all of them). The parameters in
    `tied` (by id) are left out of the norms; their gradients are always formed, never ghost-normed."""
    dtype = _dtype(module)
    ghost = id(module.weight) not in tied
    layer = _Layer(torch.zeros(examples, device=a.device, dtype=dtype))
    if g is None:  # the loss does not depend on this layer's output: zero gradients
        return layer
    a, g = a.to(dtype), g.to(dtype)
    if isinstance(module, nn.Linear):
        a_columns = a.reshape(len(a), -1, a.shape[-1]).transpose(1, 2)  # [N, ..., d] -> [N, d, positions]
        g_columns = g.reshape(len(g), -1, g.shape[-1]).transpose(1, 2)
        if module.weight.requires_grad:
            squared, gradients = _weight_gradients(a_columns, g_columns, examples, ghost)
            if gradients is None:
                layer.squared_norms += squared  # ghost norm: the clipped sum is recomputed from a and g
                layer.ghost = True
            else:
                layer.per_example["weight"] = gradients.view(examples, *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            layer.per_example["bias"] = g_columns.sum(2).view(examples, -1, g_columns.shape[1]).sum(1)
    elif isinstance(module, nn.Conv2d):
        weight = module.weight
        if weight.requires_grad:
            columns = len(g) // examples * g.shape[2] * g.shape[3]
            if ghost and _ghost_is_cheaper(columns, weight[0].numel(), weight.shape[0]):
                # The convolution as a matrix product over its unfolded input patches [N, d k k, positions].
                patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
                layer.squared_norms += _weight_gradients(patches, g.flatten(2), examples)[0]
                layer.ghost = True
            else:
                layer.per_example["weight"] = _conv_weight_gradients(module, a, g, examples)
        if module.bias is not None and module.bias.requires_grad:
            layer.per_example["bias"] = g.sum((2, 3)).view(examples, -1, g.shape[1]).sum(1)
    elif isinstance(module, nn.GroupNorm):
        def per_channel(t):  # [N, C, *positions] -> [B, C], summed over positions and rows
            return t.reshape(len(t), t.shape[1], -1).sum(2).view(examples, -1, t.shape[1]).sum(1)

        if module.weight is not None and module.weight.requires_grad:
            layer.per_example["weight"] = per_channel(F.group_norm(a, module.num_groups, eps=module.eps) * g)
        if module.bias is not None and module.bias.requires_grad:
            layer.per_example["bias"] = per_channel(g)
    elif isinstance(module, nn.Embedding):
        hits = F.one_hot(a.long(), module.num_embeddings).to(dtype)  # [N, ..., V]
        if module.padding_idx is not None:
            hits[..., module.padding_idx] = 0  # torch leaves the padding row's gradient at zero
        layer.per_example["weight"] = torch.bmm(_grouped(hits, examples).transpose(1, 2), _grouped(g, examples))
    for name, grad in layer.per_example.items():
        if id(getattr(module, name)) not in tied:
            layer.squared_norms += grad.flatten(1).square().sum(1)
    return layer


def _ghost_clipped_sum(module: nn.Module, a: torch.Tensor, g: torch.Tensor, factors: torch.Tensor) -> None:
    """Set the weight's .grad to sum_b c_b A_b^T G_b = A^T (c * G), its per-example gradients unformed."""
    weight = module.weight
    dtype = _dtype(module)
    a, g = a.to(dtype), g.to(dtype)
    scaled = g * _row_factors(factors, g.shape[0], g.dim())
    if isinstance(module, nn.Linear):
        summed = scaled.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
    else:
        summed = torch.nn.grad.conv2d_weight(a, weight.shape, scaled, module.stride, module.padding, module.dilation)
    weight.grad = summed.to(weight.dtype)
