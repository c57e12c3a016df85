"""DP-SGD on stock Opacus, with the run's PrivacyLedger as the only source of truth for privacy.

One logical step: Poisson-sample a logical batch (each member independently with probability
q = logical_batch / N), split it into physical batches that fit in memory (as Opacus'
BatchMemoryManager splits), compute every example's gradient, clip it to `clip_norm`, sum, add
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
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
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


def steps_for(epochs: float, sample_rate: float) -> int:
    """Noisy steps that make `epochs` passes in expectation at Poisson rate q: round(epochs / q), at least 1."""
    return max(1, round(epochs / sample_rate))


class DPSGDPhase:
    """One DP-SGD phase on the members: the object a method writes its private training loop against.

        with DPSGDPhase(model, (images, labels), ledger, ctx, logical_batch=..., epochs=..., lr=...) as phase:
            for batch in phase.logical_batches():
                phase.step(loss_fn, batch)
                ...  # anything between two private steps, e.g. a GAN's generator update
        trained = phase.result

    Construction checks every setting and touches nothing. Entering calibrates the noise multiplier
    against everything the ledger already holds and records the mechanism before any member is read
    (a phase that would overspend never starts), then wraps the model for per-example gradients and
    builds Opacus' optimizer with the recorded mechanism's sigma. `logical_batches()` yields the accounted
    number of Poisson-sampled logical batches (this rank's share under torchrun); `step` takes one
    noisy step on one of them. Leaving unwraps the model and checks that the noisy steps taken equal
    the steps the ledger accounts.

    `loss_fn(model, *rows)` returns per-row losses; rows repeat each example `multiplicity` times
    consecutively and should draw independent randomness per row. With an infinite target the noise
    is zero; `clip=False` then also turns clipping off (only allowed without privacy).
    """

    def __init__(
        self,
        model: nn.Module,
        members: Sequence[torch.Tensor],
        ledger: PrivacyLedger,
        ctx: RunContext,
        *,
        name: str = "dp-sgd",
        logical_batch: int,
        physical_batch: int | None = None,
        steps: int | None = None,
        epochs: float | None = None,
        clip_norm: float = 1.0,
        lr: float,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        betas: tuple[float, float] | None = None,
        multiplicity: int = 1,
        grad_sample_mode: str = "functorch",
        ema_decay: float = 0.999,
        clip: bool = True,
    ):
        self.canaries = ctx.canaries  # an audited run's (privbench.attacks.canaries), else None
        if self.canaries is not None:
            members = self.canaries.plant(list(members))
        n = len(members[0])
        _validate(n, logical_batch, physical_batch, steps, epochs, multiplicity, grad_sample_mode, ema_decay, ctx.compute)
        if optimizer not in OPTIMIZERS:
            raise PrivbenchError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if betas is not None and optimizer == "sgd":
            raise PrivbenchError("betas are Adam's moment decays; plain SGD has none: leave them unset or use adam")
        if not clip and ledger.private:
            raise PrivbenchError("clipping bounds each member's influence; it can be off only with eps = inf")
        self.model, self.members, self.ledger, self.ctx, self.name = model, members, ledger, ctx, name
        self.logical_batch, self.physical_batch = logical_batch, physical_batch
        self.sample_rate = logical_batch / n
        self.steps = steps if steps is not None else steps_for(epochs, self.sample_rate)
        self.clip_norm, self.lr, self.optimizer_name, self.weight_decay = clip_norm, lr, optimizer, weight_decay
        self.optimizer_options = {} if betas is None else {"betas": tuple(betas)}
        self.multiplicity, self.grad_sample_mode, self.ema_decay, self.clip = multiplicity, grad_sample_mode, ema_decay, clip
        self.mechanism: Mechanism | None = None
        self.taken = 0  # noisy steps, counted by Opacus' step hook
        self._physical_batches = 0
        self._cleanup: ExitStack | None = None

    def __enter__(self) -> DPSGDPhase:
        ctx = self.ctx
        self.mechanism = self.ledger.record(self.ledger.calibrate(
            self.name, "dp-sgd", sample_rate=self.sample_rate, steps=self.steps, sensitivity=self.clip_norm))
        max_grad_norm = self.mechanism.sensitivity if self.clip else NO_CLIP
        with ExitStack() as cleanup:
            self.model = lay_out(self.model.to(ctx.device), ctx.compute).train()
            self.ema = copy.deepcopy(self.model).requires_grad_(False)
            world = current_world()
            if self.canaries is not None:
                if world.size > 1:
                    raise PrivbenchError("an audited run plants its canaries in one process: run it without torchrun")
                self.canaries.start(self.model, self.sample_rate, max_grad_norm, self.mechanism)
            self.wrapped, handles = wrap_for_dp(self.model, self.grad_sample_mode, max_grad_norm)
            cleanup.callback(self._unwrap, handles)
            self._members = [t.to(ctx.device) for t in self.members]  # once: no host copy per step
            if world.size > 1:
                broadcast_parameters(self.model)
            dp_optimizer = optimizer_class(self.grad_sample_mode, world.size)
            if self.canaries is not None:
                dp_optimizer = self.canaries.instrument(dp_optimizer)
            self.optimizer = dp_optimizer(
                OPTIMIZERS[self.optimizer_name](self.wrapped.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                                **self.optimizer_options),
                noise_multiplier=self.mechanism.noise_multiplier,  # the ledger's sigma, not a copy of it
                max_grad_norm=max_grad_norm,
                # Poisson batches vary; the denominator must not. Each rank divides by its share and the
                # all-reduce averages over ranks, so the update is divided by logical_batch in all.
                expected_batch_size=self.logical_batch / world.size,
                loss_reduction="mean",
                generator=ctx.mechanism_generator(f"{self.name}-noise", on_device=True),
            )
            # Opacus calls the step hook once per noisy logical step (the hook its own accountant uses).
            self.optimizer.attach_step_hook(self._count_step)
            self._sampler = self._poisson_sampler(world)
            self._bar = cleanup.enter_context(tqdm(total=self.steps, desc=self.name, disable=None if ctx.progress else True))
            cleanup.enter_context(quiet_opacus())
            self._cleanup = cleanup.pop_all()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._cleanup.close()
        self.model.zero_grad(set_to_none=True)
        if exc_type is not None:
            return
        if self.taken != self.mechanism.steps:
            raise RuntimeError(f"{self.name}: took {self.taken} noisy steps; the ledger accounts {self.mechanism.steps}")
        if self.canaries is not None:
            self.canaries.finish()
        self.ctx.log.info("%s: sigma %.4g, q %.4g, %d steps, clip %g, %d process(es)", self.name,
                          self.mechanism.noise_multiplier, self.sample_rate, self.taken, self.clip_norm, current_world().size)

    def _count_step(self, _optimizer: DPOptimizer) -> None:
        self.taken += 1

    def _unwrap(self, handles: list) -> None:
        self.wrapped.to_standard_module()
        for handle in handles:
            handle.remove()

    def _poisson_sampler(self, world) -> Sampler[list[int]]:
        n = len(self._members[0])
        if world.size > 1:
            return ShardedPoissonSampler(
                # The dealing into shards decides no member's inclusion (each is included with rate q in
                # any shard): it stays seeded, alike on every rank.
                n, self.sample_rate, self.steps, world, shard_generator=self.ctx.generator(f"{self.name}-shards"),
                generator=self.ctx.mechanism_generator(per_rank(f"{self.name}-sampling")),
            )
        return UniformWithReplacementSampler(num_samples=n, sample_rate=self.sample_rate, steps=self.steps,
                                             generator=self.ctx.mechanism_generator(f"{self.name}-sampling"))

    def logical_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The accounted number of logical batches, each member in each independently with rate q."""
        yield from DataLoader(_Rows(self._members), batch_sampler=self._sampler, collate_fn=_no_collation)

    def step(self, loss_fn: LossFn, batch: Sequence[torch.Tensor]) -> None:
        """One noisy step on a logical batch: the per-example gradients of its physical batches, each
        clipped, are summed; noise is added once, the sum divided by the expected batch size, the
        optimizer steps and the EMA follows."""
        if self.physical_batch is None:
            self.physical_batch = self._fitting_physical_batch(loss_fn)
        taken = self.taken
        if self.canaries is not None:
            self.canaries.before_step(loss_fn)
        # As Opacus' BatchMemoryManager splits: every physical batch but the last only accumulates.
        pieces = max(1, math.ceil(len(batch[0]) / self.physical_batch))
        for i, chunk in enumerate(zip(*(t.tensor_split(pieces) for t in batch))):
            self.optimizer.signal_skip_step(do_skip=i < pieces - 1)
            self.optimizer.zero_grad()
            check = self._physical_batches < CHECKED_BATCHES or self._physical_batches % CHECK_EVERY == 0
            per_example_backward(self.wrapped, self.optimizer, loss_fn, [in_layout(t, self.ctx.compute) for t in chunk],
                                 self.multiplicity, self.grad_sample_mode, self.ctx.compute, check)
            self.optimizer.step()
            self._physical_batches += 1
        if self.taken != taken + 1:
            raise RuntimeError(f"{self.name}: a logical batch took {self.taken - taken} noisy steps instead of one")
        _update_ema(self.ema, self.model, self.ema_decay)
        self._bar.update(1)

    @contextmanager
    def frozen(self) -> Iterator[nn.Module]:
        """The model for post-processing between private steps (a GAN's generator update reads its
        discriminator): parameters frozen and per-example hooks off, so nothing computed through it
        enters a gradient that is clipped and noised, or the optimizer's state."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        self.wrapped.disable_hooks()
        try:
            yield self.model
        finally:
            self.wrapped.enable_hooks()
            for p in trainable:
                p.requires_grad_(True)

    @property
    def result(self) -> DPSGDResult:
        """The trained model, its EMA and the recorded mechanism, once the phase has ended."""
        return DPSGDResult(self.model, self.ema.eval(), self.mechanism, self.taken, self.optimizer)

    def _fitting_physical_batch(self, loss_fn: LossFn) -> int:
        """The physical batch when none is configured: on CUDA the largest power of two (up to the
        logical batch) whose per-sample backward fits in memory, tried on all-zero stand-ins, never on
        members; on CPU, CPU_PHYSICAL_BATCH. It bounds memory only, not the result or its privacy."""
        ctx = self.ctx
        if ctx.device.type != "cuda":
            return min(self.logical_batch, CPU_PHYSICAL_BATCH)

        def try_batch(b: int) -> None:
            stand_ins = [in_layout(torch.zeros_like(t[:1]).expand(b, *t.shape[1:]).contiguous(), ctx.compute)
                         for t in self._members]
            try:
                per_example_backward(self.wrapped, self.optimizer, loss_fn, stand_ins, self.multiplicity,
                                     self.grad_sample_mode, ctx.compute, check=False)
            finally:
                self.optimizer.zero_grad()

        fitting = largest_fitting_batch(try_batch, limit=self.logical_batch)
        ctx.log.info("physical batch %d: the largest that fits in %s memory", fitting, ctx.device)
        return fitting


def train_dp_sgd(
    model: nn.Module,
    loss_fn: LossFn,
    dataset_tensors: Sequence[torch.Tensor],
    ledger: PrivacyLedger,
    ctx: RunContext,
    **settings,
) -> DPSGDResult:
    """Train `model` with DP-SGD on the members in `dataset_tensors`, charging `ledger`: a DPSGDPhase
    (whose keyword settings this takes) with nothing between its steps."""
    with DPSGDPhase(model, dataset_tensors, ledger, ctx, **settings) as phase:
        for batch in phase.logical_batches():
            phase.step(loss_fn, batch)
    return phase.result
