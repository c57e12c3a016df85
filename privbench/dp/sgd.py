"""DP-SGD on stock Opacus, with the run's PrivacyLedger as the only source of truth for privacy.

One logical step: Poisson-sample a logical batch (each member independently with probability
q = logical_batch / N), split it into physical batches that fit in memory (Opacus'
BatchMemoryManager), compute every example's gradient, clip it to `clip_norm`, sum, add
N(0, (sigma * clip_norm)^2) noise once per logical step, divide by the expected batch size and step.
That is the subsampled Gaussian mechanism (sigma, q, steps) the ledger composes; sigma comes from the
ledger's calibration and the very same Mechanism object feeds Opacus' optimizer.

Noise multiplicity (Dockhorn et al., DPDM): the engine repeats each example K times, the caller's
loss function draws independent randomness per row (diffusion noise level and noise) and returns one
loss per row, and the engine averages the K rows of each example before clipping. Each example still
contributes one clipped gradient, so privacy is unchanged while the gradient's variance drops.

Speed (privbench.compute, the run's `compute` settings): the members live on the device for the
whole phase; the forward pass may run under bf16 autocast and in channels-last layout, but
per-sample gradients are cast to float32 before Opacus takes their norms, so clipping and noise are
float32 whatever the precision. Under torchrun the phase is data-parallel (privbench.dp.distributed).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from privbench.compute import ComputeConfig, autocast, in_layout, largest_fitting_batch, lay_out
from privbench.context import RunContext
from privbench.dp.bookkeeping import BookKeeping, shared_parameters
from privbench.dp.distributed import ShardedPoissonSampler, broadcast_parameters, current_world, per_rank
from privbench.dp.ledger import Mechanism, PrivacyLedger
from privbench.errors import PrivbenchError

# loss_fn(model, *rows) -> per-row losses [rows]; rows are the batch tensors, each example repeated
# `multiplicity` times consecutively (row b * K + k is draw k of example b).
LossFn = Callable[..., torch.Tensor]

# functorch, hooks: Opacus materialises every per-sample gradient; ghost: Opacus' ghost clipping
# (norms, then a second backward pass); bookkeeping: privbench.dp.bookkeeping (one backward pass).
GRAD_SAMPLE_MODES = ("functorch", "hooks", "ghost", "bookkeeping")
# The modes that leave the clipped sum itself in p.grad, for Opacus' FastGradientClipping optimizers.
CLIPPED_SUM_MODES = ("ghost", "bookkeeping")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Clipping "off" (eps = inf audits only): a finite bound no float32 gradient reaches, so Opacus'
# clip factor is 1 and noise_multiplier * max_grad_norm stays 0 rather than 0 * inf = nan.
NO_CLIP = float(torch.finfo(torch.float32).max)
# Per-sample gradients must sum to the batch gradient autograd computes; this relative tolerance
# separates float reordering (~1e-6; bf16 autocast: ~4e-3, measured on the smoke UNet) from a wrong
# per-sample gradient (O(1)).
CONSISTENCY_RTOL = {"fp32": 1e-3, "bf16": 3e-2}
# The check costs a host synchronisation: it runs on the first physical batches and then now and then.
CHECKED_BATCHES, CHECK_EVERY = 10, 100
# Physical batch on CPU when none is configured (memory is rarely the limit there; cache is).
CPU_PHYSICAL_BATCH = 128
CONSISTENCY_FLOOR = 1e-6


@dataclass
class DPSGDResult:
    """What a DP-SGD phase leaves behind: the trained model, its EMA copy, and the mechanism the
    ledger recorded for it (with the Opacus optimizer that used that mechanism's noise)."""

    model: nn.Module
    ema: nn.Module
    mechanism: Mechanism
    steps: int
    optimizer: DPOptimizer


class _Rows(Dataset):
    """In-memory tensors fetched a whole index list at a time (DataLoader uses __getitems__), so a
    logical batch of thousands is one gather and an empty Poisson batch is a [0, ...] tensor."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = tuple(tensors)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


@contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence two warnings Opacus' functorch path raises on every batch, both harmless here: its
    backward hooks fire on module outputs (the inputs are data, not parameters), and it requests
    float32 autocast on CPU, which PyTorch declines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        yield


def _no_collation(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The DataLoader's collate step: _Rows.__getitems__ already returns the batch's tensors."""
    return batch


def _contiguous_inputs(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def _fix_conv_inputs(model: nn.Module) -> list:
    """Make every convolution's input contiguous for Opacus' unfold-based conv grad sampler.

    Diffusers' attention blocks hand the following convolutions a non-contiguous (channels-last)
    tensor; Opacus 1.6's conv unfold then yields per-sample gradients of exactly zero for them,
    which would silently clip and noise the wrong gradients. A forward pre-hook on the model (Opacus
    itself is untouched) changes no value the model computes. Returns the hook handles to remove.
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [m.register_forward_pre_hook(_contiguous_inputs) for m in model.modules() if isinstance(m, convs)]


def wrap_for_dp(model: nn.Module, mode: str, clip_norm: float) -> tuple[nn.Module, list]:
    """The module computing per-sample gradients in `mode` (ghost, bookkeeping: their norms and the
    clipped sum)."""
    if mode not in GRAD_SAMPLE_MODES:
        choices = ", ".join(GRAD_SAMPLE_MODES)
        raise PrivbenchError(f"unknown grad-sample mode {mode!r}; choose one of: {choices}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivbenchError(
            f"model cannot train with DP-SGD ({'; '.join(map(str, errors))}); "
            "replace BatchNorm by GroupNorm (opacus.validators.ModuleValidator.fix)"
        )
    # Tied weights: functorch, hooks and book-keeping sum a parameter's per-sample gradients over its
    # modules before the norm; Opacus' ghost clipping cannot, and says so only at the first forward pass.
    if mode == "ghost" and (tied := shared_parameters(model)):
        shared = "; ".join(" is ".join(names) for names in tied)
        raise PrivbenchError(f"ghost clipping cannot clip parameters shared between modules ({shared}); "
                             "use grad_sample_mode=bookkeeping or functorch")
    if mode == "functorch":
        return GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=True), []
    if mode == "bookkeeping":
        return BookKeeping(model, clip_norm), []
    handles = _fix_conv_inputs(model)
    if mode == "hooks":
        return GradSampleModule(model, batch_first=True, loss_reduction="sum"), handles
    wrapped = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", max_grad_norm=clip_norm, use_ghost_clipping=True
    )
    return wrapped, handles


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16 up to float32; float32 and float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_grad_samples(params: Sequence[nn.Parameter], rtol: float = CONSISTENCY_RTOL["fp32"]) -> None:
    """Raise unless each parameter's per-sample gradients sum to its ordinary gradient.

    Autograd's batch gradient is computed independently of Opacus' per-sample machinery, so this
    cheap identity catches a grad sampler that mishandles a layer (e.g. hooks mode returning zeros
    for convolutions after attention) before wrong gradients are clipped, noised and accounted.
    """
    checked = [(i, p) for i, p in enumerate(params) if p.grad is not None and getattr(p, "grad_sample", None) is not None]
    errors = [(p.grad_sample.sum(0) - p.grad).norm() for _, p in checked]
    scales = [p.grad.norm() + p.grad_sample.abs().sum(0).norm() for _, p in checked]
    # A parameter whose true gradient is zero (e.g. one softmax cancels) carries only float noise, so
    # its own scale is no yardstick: the floor is relative to the largest gradient in the model.
    floor = CONSISTENCY_FLOOR * max(scales, default=0.0)
    wrong = [f"#{i} {tuple(p.shape)}" for (i, p), err, scale in zip(checked, errors, scales)
             if err > rtol * scale + floor + 1e-12]
    if wrong:
        raise PrivbenchError(
            f"per-sample gradients of {len(wrong)} parameter tensors ({', '.join(wrong[:5])}"
            f"{', ...' if len(wrong) > 5 else ''}) do not sum to the batch gradient; "
            "use grad_sample_mode='functorch'"
        )


def per_example_backward(
    wrapped: nn.Module,
    optimizer: DPOptimizer | None,
    loss_fn: LossFn,
    batch: Sequence[torch.Tensor],
    multiplicity: int,
    mode: str,
    compute: ComputeConfig = ComputeConfig(),
    check: bool = True,
) -> None:
    """Per-example gradients of one physical batch, ready for Opacus' clip-and-accumulate.

    The model sees B * K rows; each example's loss is the mean of its K row losses. Backward of the
    sum of example losses gives row (b, k) the gradient (1/K) grad l_bk, so summing the K rows' grad
    samples yields exactly grad (mean_k l_bk): the gradient that is then clipped once per example.
    """
    params = [p for p in wrapped.parameters() if p.requires_grad]
    n = len(batch[0])
    if n == 0:
        # An empty Poisson batch still takes a noisy step: zero contributions, noise as usual.
        for p in params:
            p.grad_sample = p.new_zeros((0, *p.shape))
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return
    rows = [t.repeat_interleave(multiplicity, dim=0) for t in batch]
    with autocast(params[0].device, compute):
        per_row = _at_least_float32(loss_fn(wrapped, *rows))
    if per_row.shape != (n * multiplicity,):
        raise PrivbenchError(
            f"loss_fn must return one loss per row, shape ({n * multiplicity},), got {tuple(per_row.shape)}"
        )
    per_example = per_row.view(n, multiplicity).mean(dim=1)
    if mode == "ghost":
        # Two backward passes: per-example norms, then the clipped sum in p.grad.
        DPTensorFastGradientClipping(wrapped, optimizer, per_example, loss_reduction="sum").backward()
        return
    if mode == "bookkeeping":
        wrapped.clipped_backward(per_example)  # one backward pass; the clipped sum in p.grad
        return
    per_example.sum().backward()
    for p in params:
        # At least float32 before Opacus takes the norms: under bf16 autocast some come back in bf16.
        p.grad_sample = _at_least_float32(p.grad_sample)
        if multiplicity > 1:
            p.grad_sample = p.grad_sample.view(n, multiplicity, *p.shape).sum(dim=1)
    if check:
        check_grad_samples(params, CONSISTENCY_RTOL[compute.precision])


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[torch.Tensor],
    mode: str = "functorch",
    multiplicity: int = 1,
) -> dict[str, torch.Tensor]:
    """The per-example gradients [B, *param.shape] that training would clip, by parameter name.

    Runs the very path training uses (wrapping, multiplicity folding, consistency check) on one
    batch and leaves `model` as it was. Ghost and book-keeping clipping never materialise every
    per-sample gradient, so they have none to return.
    """
    if mode in CLIPPED_SUM_MODES:
        raise PrivbenchError(f"{mode} clipping computes per-sample norms only; use 'functorch' or 'hooks'")
    wrapped, handles = wrap_for_dp(model, mode, clip_norm=1.0)
    try:
        with quiet_opacus():
            per_example_backward(wrapped, None, loss_fn, batch, multiplicity, mode)
        return {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        wrapped.to_standard_module()
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)


def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters only; buffers are copied. Post-processing
    of DP iterates, so it costs no privacy."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def _fitting_physical_batch(wrapped, dp_optimizer, loss_fn, members, multiplicity, mode, logical_batch, ctx) -> int:
    """The physical batch when none is configured: on CUDA the largest power of two (up to the
    logical batch) whose per-sample backward fits in memory, tried on all-zero stand-ins, never on
    members; on CPU, CPU_PHYSICAL_BATCH. It bounds memory only, not the result or its privacy."""
    if ctx.device.type != "cuda":
        return min(logical_batch, CPU_PHYSICAL_BATCH)

    def try_batch(b: int) -> None:
        stand_ins = [in_layout(torch.zeros_like(t[:1]).expand(b, *t.shape[1:]).contiguous(), ctx.compute) for t in members]
        try:
            per_example_backward(wrapped, dp_optimizer, loss_fn, stand_ins, multiplicity, mode, ctx.compute, check=False)
        finally:
            dp_optimizer.zero_grad()

    fitting = largest_fitting_batch(try_batch, limit=logical_batch)
    ctx.log.info("physical batch %d: the largest that fits in %s memory", fitting, ctx.device)
    return fitting


def optimizer_class(mode: str, world_size: int = 1) -> type[DPOptimizer]:
    """Opacus' optimizer for the mode; across processes, the one whose rank 0 alone adds noise."""
    if mode in CLIPPED_SUM_MODES:
        return DistributedDPOptimizerFastGradientClipping if world_size > 1 else DPOptimizerFastGradientClipping
    return DistributedDPOptimizer if world_size > 1 else DPOptimizer


def _validate(n, logical_batch, physical_batch, steps, epochs, multiplicity, mode, ema_decay, compute) -> None:
    if not 1 <= logical_batch <= n:
        raise PrivbenchError(f"logical_batch must lie in [1, {n}] (the number of members), got {logical_batch}")
    if physical_batch is not None and physical_batch < 1:
        raise PrivbenchError(f"physical_batch must be >= 1 (or null: the largest that fits), got {physical_batch}")
    if mode == "ghost" and compute.precision != "fp32":
        raise PrivbenchError(
            "ghost clipping takes its per-sample norms from the autocast activations, which would not be float32; "
            "use --set compute.precision=fp32 or grad_sample_mode=functorch"
        )
    if (steps is None) == (epochs is None):
        raise PrivbenchError("give exactly one of steps or epochs")
    if multiplicity < 1:
        raise PrivbenchError(f"multiplicity must be >= 1, got {multiplicity}")
    if mode == "ghost" and multiplicity > 1:
        raise PrivbenchError(
            "ghost clipping clips per-row norms and cannot average K rows per example before clipping; "
            "use grad_sample_mode='bookkeeping' (or functorch, hooks) with multiplicity > 1"
        )
    if not 0 <= ema_decay < 1:
        raise PrivbenchError(f"ema_decay must lie in [0, 1), got {ema_decay}")


def train_dp_sgd(
    model: nn.Module,
    loss_fn: LossFn,
    dataset_tensors: Sequence[torch.Tensor],
    ledger: PrivacyLedger,
    ctx: RunContext,
    *,
    name: str = "dp-sgd",
    logical_batch: int,
    physical_batch: int | None,
    steps: int | None = None,
    epochs: float | None = None,
    clip_norm: float = 1.0,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    multiplicity: int = 1,
    grad_sample_mode: str = "functorch",
    ema_decay: float = 0.999,
    clip: bool = True,
) -> DPSGDResult:
    """Train `model` with DP-SGD on the members in `dataset_tensors`, charging `ledger`.

    `loss_fn(model, *rows)` returns per-row losses; rows repeat each example `multiplicity` times
    consecutively and should draw independent randomness per row. The noise multiplier is
    calibrated so that everything in the ledger plus this phase meets the ledger's target, and the
    mechanism is recorded before any member is read. With an infinite target the noise is zero;
    `clip=False` then also turns clipping off (only allowed without privacy).
    """
    n = len(dataset_tensors[0])
    _validate(n, logical_batch, physical_batch, steps, epochs, multiplicity, grad_sample_mode, ema_decay, ctx.compute)
    if optimizer not in OPTIMIZERS:
        raise PrivbenchError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if not clip and ledger.private:
        raise PrivbenchError("clipping bounds each member's influence; it can be off only with eps = inf")
    q = logical_batch / n
    total_steps = steps if steps is not None else max(1, round(epochs / q))

    # Account first: the mechanism is calibrated against everything already spent and recorded
    # before training reads a single member; a phase that would overspend never starts.
    mechanism = ledger.record(
        ledger.calibrate(name, "dp-sgd", sample_rate=q, steps=total_steps, sensitivity=clip_norm)
    )
    max_grad_norm = mechanism.sensitivity if clip else NO_CLIP

    model = lay_out(model.to(ctx.device), ctx.compute).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    wrapped, handles = wrap_for_dp(model, grad_sample_mode, max_grad_norm)
    members = [t.to(ctx.device) for t in dataset_tensors]  # once: no host copy per step
    world = current_world()
    if world.size > 1:
        broadcast_parameters(model)
    dp_optimizer = optimizer_class(grad_sample_mode, world.size)(
        OPTIMIZERS[optimizer](wrapped.parameters(), lr=lr, weight_decay=weight_decay),
        noise_multiplier=mechanism.noise_multiplier,  # the ledger's sigma, not a copy of it
        max_grad_norm=max_grad_norm,
        # Poisson batches vary; the denominator must not. Each rank divides by its share and the
        # all-reduce averages over ranks, so the update is divided by logical_batch in all.
        expected_batch_size=logical_batch / world.size,
        loss_reduction="mean",
        generator=ctx.mechanism_generator(f"{name}-noise", on_device=True),
    )
    if physical_batch is None:
        physical_batch = _fitting_physical_batch(wrapped, dp_optimizer, loss_fn, members, multiplicity, grad_sample_mode,
                                                 logical_batch, ctx)
    taken = []
    # Opacus calls the step hook once per noisy logical step (the hook its own accountant uses).
    dp_optimizer.attach_step_hook(lambda _opt: taken.append(1))

    if world.size > 1:
        sampler = ShardedPoissonSampler(
            # The dealing into shards decides no member's inclusion (each is included with rate q in
            # any shard): it stays seeded, alike on every rank.
            n, q, total_steps, world, shard_generator=ctx.generator(f"{name}-shards"),
            generator=ctx.mechanism_generator(per_rank(f"{name}-sampling")),
        )
    else:
        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=q, generator=ctx.mechanism_generator(f"{name}-sampling"), steps=total_steps
        )
    loader = DataLoader(_Rows(members), batch_sampler=sampler, collate_fn=_no_collation)
    bar = tqdm(total=total_steps, desc=name, disable=None if ctx.progress else True)
    try:
        with quiet_opacus(), BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical_batch, optimizer=dp_optimizer
        ) as physical_loader:
            for index, batch in enumerate(physical_loader):
                dp_optimizer.zero_grad()
                before = len(taken)
                check = index < CHECKED_BATCHES or index % CHECK_EVERY == 0
                per_example_backward(wrapped, dp_optimizer, loss_fn, [in_layout(t, ctx.compute) for t in batch], multiplicity,
                          grad_sample_mode, ctx.compute, check)
                dp_optimizer.step()
                if len(taken) > before:
                    _update_ema(ema, model, ema_decay)
                    bar.update(1)
    finally:
        bar.close()
        wrapped.to_standard_module()
        for h in handles:
            h.remove()
    if len(taken) != mechanism.steps:
        raise RuntimeError(f"{name}: took {len(taken)} noisy steps; the ledger accounts {mechanism.steps}")
    sigma = mechanism.noise_multiplier
    ctx.log.info("%s: sigma %.4g, q %.4g, %d steps, clip %g, %d process(es)", name, sigma, q, len(taken), clip_norm,
                 world.size)
    model.zero_grad(set_to_none=True)
    return DPSGDResult(model, ema.eval(), mechanism, len(taken), dp_optimizer)
