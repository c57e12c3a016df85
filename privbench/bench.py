"""`privbench bench`: throughput of every costly stage on one device, and the `paper` preset's cost.

One run measures, with the diffusion UNet of a preset on random inputs of its dataset's shape:
  - the non-private training step (forward, backward, Adam), as public pre-training runs it;
  - the DP-SGD step of each grad-sample mode on the same model and the same physical batch: the
    engine's own wrapping and per-example backward (`privbench.dp.sgd`), clipping, Gaussian noise and
    the optimizer step of Opacus' DPOptimizer, with its ratio to the non-private step;
  - EDM's Heun sampler, per network call and at the preset's number of sampler steps;
  - Inception-v3 FID features, the way runs compute them (clean resize, then the network);
  - one training step of each CA classifier of the preset;
each with the median and range of its timed steps (warm-up excluded) and its peak memory.

From those times it projects PrivImage's end-to-end cost at the `paper` preset on CIFAR-10, stage by
stage, and lays it beside DPImageBench's published cost. The projection scales per-row times
linearly (see `project`); it is labelled as projected wherever it is printed.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import opacus
import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from tqdm.auto import tqdm

from privbench.compute import ComputeConfig, autocast, in_layout, lay_out
from privbench.config import PRESETS, build, harness_presets
from privbench.data import DATASETS, make_split
from privbench.diffusion.edm import diffusion_loss_fn, edm_sampler
from privbench.diffusion.pipeline import EDM, UNetConfig
from privbench.dp.sgd import GRAD_SAMPLE_MODES, optimizer_class, per_example_backward, quiet_opacus, wrap_for_dp
from privbench.errors import PrivbenchError
from privbench.methods import METHODS, presets
from privbench.metrics.cost import CostRecorder, _cpu_name
from privbench.metrics.inception import load_inception, network_outputs
from privbench.nets.classifiers import build_classifier
from privbench.nets.unet import build_unet
from privbench.runtime import resolve_device
from privbench.store import commit_id, write_atomic

# The dataset whose shape each preset's UNet is built for: smoke and cpu run on the embedded MNIST
# (smoke's UNet attends at 7x7, i.e. 28 / 4), small and paper on CIFAR-10; the preset's
# data.resolution, where set, replaces the dataset's native one.
PRESET_DATASETS = {"smoke": "mnist", "cpu": "mnist", "small": "cifar10", "paper": "cifar10"}
NUM_CLASSES = 10  # MNIST and CIFAR-10 alike
# Any sigma > 0 costs the same: Opacus draws one Gaussian per parameter whatever its scale.
BENCH_NOISE_MULTIPLIER = 1.0
# Three noise levels are five network calls per image: enough to time one call, cheap on a CPU.
BENCH_SAMPLER_STEPS = 3

# CIFAR-10's official split (Krizhevsky 2009): 5,000 train images per class, 10,000 test images.
CIFAR10_TRAIN_PER_CLASS = 5_000
CIFAR10_TEST = 10_000
# DPImageBench (Chen et al. 2025, arXiv:2503.14681), PrivImage on CIFAR-10 on 4x RTX A6000 Ada, in
# hours per stage, as issue 6 quotes it. DPImageBench fine-tunes on all 50,000 train images.
DPIMAGEBENCH_HOURS = {"pre-training": 32.0, "DP-SGD fine-tuning": 20.5, "sampling": 0.17}
DPIMAGEBENCH_DEVICE = "4x RTX A6000 Ada"

PERF_HEADER = """# Performance: `privbench bench`

Throughput of privbench's costly stages on one device, and the `paper` preset's end-to-end cost
projected from it. Every section below was appended by `privbench bench` (default
`--append leaderboards/perf.md`); none is edited by hand. Each names its date, device, versions,
privbench commit (`+dirty`: tracked files differed from it) and the exact command that regenerates it.

Rows: the non-private training step (forward, backward, Adam); the DP-SGD step of each grad-sample
mode (Opacus' functorch, hooks and ghost; privbench's bookkeeping) on the same model and physical
batch (per-example gradients or norms, for functorch and
hooks the engine's check that they sum to the batch gradient, clipping, noise, optimizer step; "vs
non-private" is its time per row over the non-private step's: the ratio of step times at K = 1);
EDM's Heun sampler; Inception-v3 FID features (clean resize included); one step of each CA
classifier. Times are the median (min-max) over the timed steps, warm-up excluded; images/s = images
/ median. Peak memory is the device's allocation on CUDA, the process's resident set on CPU. The
projection scales those times per row (see its assumptions); it is never a measurement of a whole
run.
"""


@dataclass(frozen=True)
class BenchOptions:
    """What `privbench bench` measures; `batch=None` means the preset's DP physical batch."""

    device: str = "auto"
    preset: str = "paper"
    batch: int | None = None
    steps: int = 10
    warmup: int = 2
    modes: tuple[str, ...] = GRAD_SAMPLE_MODES
    multiplicity: int = 1
    precision: str | None = None  # None: the preset's compute.precision
    progress: bool = True

    def command(self) -> str:
        """The command line that repeats this measurement, every option spelt out."""
        return (f"privbench bench --device {self.device} --preset {self.preset} --batch {self.batch} "
                f"--steps {self.steps} --warmup {self.warmup} --modes {','.join(self.modes)} "
                f"--multiplicity {self.multiplicity} --precision {self.precision}")

    def compute(self) -> ComputeConfig:
        """The preset's compute settings (privbench/presets.yaml), with --precision if given."""
        preset = ComputeConfig(**harness_presets()[self.preset]["compute"])
        return preset if self.precision is None else replace(preset, precision=self.precision)


@dataclass(frozen=True)
class Measurement:
    """One timed stage. A row is one image through the network once: a DP step at multiplicity K
    runs images * K rows, the sampler images * calls rows."""

    stage: str
    variant: str = ""  # grad-sample mode or classifier name
    images: int = 0  # images per timed step
    multiplicity: int = 1
    calls: int = 1  # network calls per image per timed step (the sampler's)
    times_s: tuple[float, ...] = ()
    peak_memory_bytes: int | None = None
    # DP time per row over the non-private step's, same model and batch: at K = 1 the ratio of step
    # times; at K > 1 a DP step runs K rows per image, so per step it would mostly count rows.
    ratio: float | None = None
    error: str | None = None  # one line saying why the stage failed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def images_per_s(self) -> float:
        return self.images / self.median_s

    @property
    def seconds_per_row(self) -> float:
        return self.median_s / (self.images * self.multiplicity * self.calls)


@dataclass(frozen=True)
class StageProjection:
    stage: str
    work: str  # what the stage computes at the paper preset, in rows
    basis: str  # which measurement the time per row comes from
    seconds: float | None  # None: not projected (its measurement failed or does not exist)
    published_hours: float | None = None


@dataclass
class BenchReport:
    options: BenchOptions  # with the batch resolved
    device: str
    device_name: str
    shape: tuple[int, int, int]  # C, H, W
    parameters: int
    sampler_steps: int  # the preset's
    sampler_guidance: float
    measurements: list[Measurement]
    projection: list[StageProjection] | None
    versions: dict[str, str]
    commit: str | None
    host_load: tuple[float, float] | None  # 1-minute load average at start and end: other work shares the host
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def measurement(self, stage: str, variant: str = "", multiplicity: int = 1) -> Measurement | None:
        return next((m for m in self.measurements if (m.stage, m.variant, m.multiplicity) == (stage, variant, multiplicity)), None)


# --- presets and workload ---------------------------------------------------------------------------


def privimage_config(preset: str):
    """PrivImage's typed configuration at `preset` (the diffusion methods share its UNet and sampler)."""
    method = METHODS.get("privimage")
    return build(method.Config, presets(method)[preset], "params.")


def sampler_rows_per_image(steps: int, guidance: float) -> int:
    """Network rows per sampled image: Heun takes 2 * steps - 1 calls; guidance doubles each call's rows."""
    return (2 * steps - 1) * (1 if guidance == 1.0 else 2)


@dataclass(frozen=True)
class PaperWorkload:
    """What PrivImage computes at the `paper` preset on CIFAR-10, stage by stage."""

    members: int
    epochs: float
    logical_batch: int
    multiplicity: int
    grad_sample_mode: str
    pretrain_steps: int
    pretrain_batch: int
    samples: int
    sampler_steps: int
    guidance: float
    fid_samples: int
    fid_reference: int
    ca_classifiers: tuple[str, ...]
    ca_epochs: int

    @property
    def dp_steps(self) -> int:
        """Noisy steps, as `train_dp_sgd` counts them from epochs: round(epochs / q)."""
        return max(1, round(self.epochs / (self.logical_batch / self.members)))

    @property
    def dp_rows(self) -> int:
        """Expected rows of DP-SGD: every step's Poisson batch averages logical_batch examples x K draws."""
        return self.dp_steps * self.logical_batch * self.multiplicity

    @property
    def pretrain_rows(self) -> int:
        return self.pretrain_steps * self.pretrain_batch

    @property
    def sampler_rows(self) -> int:
        return self.samples * sampler_rows_per_image(self.sampler_steps, self.guidance)

    @property
    def fid_images(self) -> int:
        return self.fid_samples + self.fid_reference

    @property
    def ca_images(self) -> int:
        """Training images per CA classifier: every synthetic image once per epoch."""
        return self.ca_epochs * self.samples


def paper_workload() -> PaperWorkload:
    """The `paper` preset's workload, read from the presets and privbench's CIFAR-10 split."""
    config = privimage_config("paper")
    harness = harness_presets()["paper"]
    evaluation = harness["eval"]
    labels = np.repeat(np.arange(NUM_CLASSES), CIFAR10_TRAIN_PER_CLASS)
    members = len(make_split(labels, seed=0, validation_fraction=harness["data"]["validation_fraction"],
                             non_members=harness["data"].get("non_members")).members)
    return PaperWorkload(
        members=members, epochs=config.dp.epochs, logical_batch=config.dp.logical_batch,
        multiplicity=config.dp.multiplicity, grad_sample_mode=config.dp.grad_sample_mode,
        pretrain_steps=config.pretrain.steps, pretrain_batch=config.pretrain.batch_size,
        samples=evaluation["samples"], sampler_steps=config.sampler.steps, guidance=config.sampler.guidance,
        fid_samples=evaluation["fid_samples"], fid_reference=evaluation["fid_reference"] or CIFAR10_TEST,
        ca_classifiers=tuple(evaluation["ca_classifiers"]), ca_epochs=evaluation["ca_epochs"],
    )


# --- timing -----------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device, desc: str, progress: bool) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones; CUDA is synchronised around each."""
    times = []
    for i in tqdm(range(warmup + steps), desc=desc, leave=False, disable=None if progress else True):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def measure(template: Measurement, steps_of: Callable[[], AbstractContextManager], options: BenchOptions,
            device: torch.device) -> Measurement:
    """Time the step that `steps_of()` yields, with its peak memory; a failure is returned, not raised.

    A benchmark of several stages should say which one ran out of memory or hit a library limit and
    still measure the others, so any exception of the stage (not an interrupt) becomes its `error`.
    """
    desc = " ".join(filter(None, (template.stage, template.variant)))
    costs = CostRecorder()
    try:
        # The stage covers set-up and warm-up too: peak memory is the stage's, model and optimizer included.
        with costs.stage("bench", device), steps_of() as step:
            times = _time_steps(step, options.warmup, options.steps, device, desc, options.progress)
    except Exception as error:  # noqa: BLE001  (reported in the table, see above)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return replace(template, error=_one_line(error))
    record = costs.records()[0]
    peak = record["peak_device_bytes"] if device.type == "cuda" else record["peak_host_bytes"]
    return replace(template, times_s=tuple(times), peak_memory_bytes=peak)


# --- the stages -------------------------------------------------------------------------------------


@contextmanager
def plain_steps(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss_fn, lr: float,
                compute: ComputeConfig) -> Iterator[Callable[[], None]]:
    """Non-private training steps as `train_plain` takes them: mean loss, backward, Adam."""
    model = lay_out(copy.deepcopy(model), compute).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = [in_layout(t, compute) for t in batch]
    device = next(model.parameters()).device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, compute):
            loss = loss_fn(model, *batch).float().mean()
        loss.backward()
        optimizer.step()

    yield step


@contextmanager
def dp_steps(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss_fn, mode: str, multiplicity: int,
             clip_norm: float, lr: float, compute: ComputeConfig) -> Iterator[Callable[[], None]]:
    """Full DP-SGD steps of one physical batch through the engine's wrapping and per-example backward.

    The expected batch is the physical batch, so every step clips, adds noise and updates, as the
    last physical batch of a logical step does in training.
    """
    model = lay_out(copy.deepcopy(model), compute).train()
    device = next(model.parameters()).device
    batch = [in_layout(t, compute) for t in batch]
    wrapped, handles = wrap_for_dp(model, mode, clip_norm)
    optimizer = optimizer_class(mode)(
        torch.optim.Adam(wrapped.parameters(), lr=lr), noise_multiplier=BENCH_NOISE_MULTIPLIER,
        max_grad_norm=clip_norm, expected_batch_size=len(batch[0]), loss_reduction="mean",
        generator=torch.Generator(device).manual_seed(0),
    )

    def step() -> None:
        optimizer.zero_grad()
        per_example_backward(wrapped, optimizer, loss_fn, batch, multiplicity, mode, compute)
        optimizer.step()

    try:
        with quiet_opacus():
            yield step
    finally:
        wrapped.to_standard_module()
        for handle in handles:
            handle.remove()


@contextmanager
def sampling_steps(model: nn.Module, labels: torch.Tensor, shape: tuple[int, int, int], steps: int,
                   guidance: float, compute: ComputeConfig) -> Iterator[Callable[[], torch.Tensor]]:
    model = lay_out(copy.deepcopy(model), compute).eval()
    generator = torch.Generator().manual_seed(0)

    def step() -> torch.Tensor:
        with autocast(labels.device, compute):
            return edm_sampler(model, labels, (len(labels), *shape), EDM, steps, generator, guidance)

    yield step


@contextmanager
def inception_steps(images: np.ndarray, device: torch.device) -> Iterator[Callable[[], np.ndarray]]:
    """FID features as runs compute them (the harness's default chunk of 32 images)."""
    model = load_inception(device)
    yield lambda: network_outputs(model, images, device, progress=False)


@contextmanager
def classifier_steps(name: str, images: torch.Tensor, labels: torch.Tensor, lr: float) -> Iterator[Callable[[], None]]:
    """CA training steps as `train_epochs` takes them: cross-entropy, Adam, no augmentation."""
    torch.manual_seed(0)
    model = build_classifier(name, images.shape[1], NUM_CLASSES).to(images.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    yield step


# --- the run ----------------------------------------------------------------------------------------


def resolve_options(options: BenchOptions) -> BenchOptions:
    """Check the options and fill in the batch; raises PrivbenchError naming the bad one."""
    if options.preset not in PRESETS:
        raise PrivbenchError(f"unknown preset {options.preset!r}; choose one of: {', '.join(PRESETS)}")
    if bad := [m for m in options.modes if m not in GRAD_SAMPLE_MODES]:
        raise PrivbenchError(f"unknown grad-sample mode(s) {', '.join(bad)}; choose from: {', '.join(GRAD_SAMPLE_MODES)}")
    batch = options.batch if options.batch is not None else privimage_config(options.preset).dp.physical_batch
    if batch < 2:
        raise PrivbenchError(f"--batch must be at least 2 (the CA classifiers' BatchNorm needs two images), got {batch}")
    if options.steps < 1 or options.warmup < 0:
        raise PrivbenchError(f"--steps must be >= 1 and --warmup >= 0, got {options.steps} and {options.warmup}")
    if options.multiplicity < 1:
        raise PrivbenchError(f"--multiplicity must be >= 1, got {options.multiplicity}")
    options = replace(options, batch=batch)
    options.compute().validate()
    return replace(options, precision=options.compute().precision)


def versions(device: torch.device) -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__}
    if device.type == "cuda":
        found["cuda"] = torch.version.cuda
    return found


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()}, {torch.get_num_threads()} threads"


def run_bench(options: BenchOptions) -> BenchReport:
    """Measure every stage on `options.device` and project the paper preset's cost."""
    options = resolve_options(options)
    device = resolve_device(options.device)
    load_at_start = _load_average()
    config = privimage_config(options.preset)
    spec = DATASETS.get(PRESET_DATASETS[options.preset])
    resolution = harness_presets()[options.preset]["data"]["resolution"] or spec.native_resolution
    shape = (spec.channels, resolution, resolution)
    torch.manual_seed(0)
    unet: UNetConfig = config.unet
    model = build_unet(shape[1], shape[0], NUM_CLASSES, unet.base_channels, unet.channel_mult,
                       unet.layers_per_block, unet.attention_resolutions).to(device)
    inputs = torch.rand((options.batch, *shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.randint(NUM_CLASSES, (options.batch,), generator=torch.Generator().manual_seed(1))
    batch = (inputs.to(device), labels.to(device))
    loss_fn = diffusion_loss_fn(EDM, torch.Generator().manual_seed(2))

    def run(template: Measurement, steps_of: Callable[[], AbstractContextManager]) -> Measurement:
        return measure(replace(template, images=options.batch), steps_of, options, device)

    compute = options.compute()
    plain = run(Measurement("non-private step"), functools.partial(plain_steps, model, batch, loss_fn, config.dp.lr, compute))
    measurements = [plain]
    for multiplicity in sorted({1, options.multiplicity}):
        for mode in options.modes:
            if mode == "ghost" and multiplicity > 1:
                continue  # the engine refuses it: ghost clips per-row norms, not per-example means
            dp = run(Measurement("DP-SGD step", mode, multiplicity=multiplicity), functools.partial(
                dp_steps, model, batch, loss_fn, mode, multiplicity, config.dp.clip_norm, config.dp.lr, compute))
            ratio = dp.seconds_per_row / plain.seconds_per_row if dp.ok and plain.ok else None
            measurements.append(replace(dp, ratio=ratio))
    guidance = config.sampler.guidance
    measurements.append(run(
        Measurement("sampling", f"{BENCH_SAMPLER_STEPS} steps", calls=sampler_rows_per_image(BENCH_SAMPLER_STEPS, guidance)),
        functools.partial(sampling_steps, model, batch[1], shape, BENCH_SAMPLER_STEPS, guidance, compute),
    ))
    uint8_images = np.random.default_rng(0).integers(0, 256, (options.batch, shape[1], shape[2], shape[0]), dtype=np.uint8)
    measurements.append(run(Measurement("Inception features"), functools.partial(inception_steps, uint8_images, device)))
    evaluation = harness_presets()[options.preset]["eval"]
    for name in evaluation["ca_classifiers"]:
        measurements.append(run(Measurement("CA classifier step", name),
                                functools.partial(classifier_steps, name, batch[0], batch[1], evaluation["ca_lr"])))
    report = BenchReport(
        options=options, device=str(device), device_name=device_name(device), shape=shape,
        parameters=sum(p.numel() for p in model.parameters()), sampler_steps=config.sampler.steps,
        sampler_guidance=config.sampler.guidance, measurements=measurements, projection=None,
        versions=versions(device), commit=commit_id(),
        host_load=None if load_at_start is None else (load_at_start, _load_average()),
    )
    if options.preset == "paper":
        workload = paper_workload()
        report.projection = project(workload, row_costs(report, workload.grad_sample_mode))
    return report


# --- projection -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowCosts:
    """Measured seconds per network row of each stage, with the measurement each comes from."""

    dp: Measurement | None
    plain: Measurement | None
    sampler: Measurement | None
    inception: Measurement | None
    classifiers: dict[str, Measurement | None]


def _usable(m: Measurement | None) -> Measurement | None:
    return m if m is not None and m.ok else None


def row_costs(report: BenchReport, mode: str) -> RowCosts:
    """The measurements a projection uses; DP-SGD in `mode` at the largest measured multiplicity."""
    dp = [m for m in report.measurements if m.stage == "DP-SGD step" and m.variant == mode and m.ok]
    classifiers = [m for m in report.measurements if m.stage == "CA classifier step"]
    return RowCosts(
        dp=max(dp, key=lambda m: m.multiplicity, default=None),
        plain=_usable(report.measurement("non-private step")),
        sampler=_usable(next((m for m in report.measurements if m.stage == "sampling"), None)),
        inception=_usable(report.measurement("Inception features")),
        classifiers={m.variant: _usable(m) for m in classifiers},
    )


def _basis(m: Measurement | None, missing: str) -> str:
    if m is None:
        return f"{missing}: not measured or failed"
    what = " ".join(filter(None, (m.stage, m.variant, f"K = {m.multiplicity}" if m.stage == "DP-SGD step" else "")))
    return f"{what}: {m.seconds_per_row * 1e3:.4g} ms per row ({m.images * m.multiplicity * m.calls} rows per step)"


def _seconds(rows: int, m: Measurement | None) -> float | None:
    return None if m is None else rows * m.seconds_per_row


def project(w: PaperWorkload, costs: RowCosts) -> list[StageProjection]:
    """Seconds per stage of PrivImage at `w`, each = rows of the stage x measured seconds per row.

    Assumptions, printed with the table: time per row does not depend on the batch (the paper's
    physical batches are larger than a benchmark's, which on a GPU usually makes each row cheaper);
    a DP-SGD step at multiplicity K costs K times one at K = 1 per example (linear in K), scaled
    from the largest K measured; noise and the optimizer step are charged per physical batch as
    measured although training adds them once per logical step.
    """
    ca = [costs.classifiers.get(name) for name in w.ca_classifiers]
    ca_seconds = None if any(m is None for m in ca) else sum(w.ca_images * m.seconds_per_row for m in ca)
    ca_basis = "; ".join(_basis(m, f"{name} step") for name, m in zip(w.ca_classifiers, ca))
    return [
        StageProjection("pre-training", f"{w.pretrain_steps:,} Adam steps x {w.pretrain_batch} = {w.pretrain_rows:,} rows",
                        _basis(costs.plain, "non-private step"), _seconds(w.pretrain_rows, costs.plain),
                        DPIMAGEBENCH_HOURS["pre-training"]),
        StageProjection("DP-SGD fine-tuning",
                        f"{w.dp_steps:,} noisy steps (q = {w.logical_batch}/{w.members:,}, {w.epochs:g} epochs) x "
                        f"{w.logical_batch} examples x K = {w.multiplicity} = {w.dp_rows:,} rows",
                        _basis(costs.dp, f"DP-SGD step {w.grad_sample_mode}"),
                        _seconds(w.dp_rows, costs.dp), DPIMAGEBENCH_HOURS["DP-SGD fine-tuning"]),
        StageProjection("sampling", f"{w.samples:,} images x {sampler_rows_per_image(w.sampler_steps, w.guidance)} network "
                        f"calls ({w.sampler_steps} Heun steps) = {w.sampler_rows:,} rows",
                        _basis(costs.sampler, "sampling"), _seconds(w.sampler_rows, costs.sampler),
                        DPIMAGEBENCH_HOURS["sampling"]),
        StageProjection("FID features", f"{w.fid_samples:,} samples + {w.fid_reference:,} reference images",
                        _basis(costs.inception, "Inception features"), _seconds(w.fid_images, costs.inception)),
        StageProjection("CA training", f"{len(w.ca_classifiers)} classifiers x {w.ca_epochs} epochs x {w.samples:,} images",
                        ca_basis, ca_seconds),
    ]


# --- rendering and appending ------------------------------------------------------------------------


def _hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f} MiB"


def _note(m: Measurement, report: BenchReport) -> str:
    if not m.ok:
        return f"failed: {m.error}"
    if m.stage == "sampling":
        preset_calls = sampler_rows_per_image(report.sampler_steps, report.sampler_guidance)
        return (f"{m.calls} network calls per image; {1 / m.seconds_per_row:,.4g} images/s per call; "
                f"{1 / (m.seconds_per_row * preset_calls):,.4g} images/s at the preset's {report.sampler_steps} "
                f"steps ({preset_calls} calls)")
    if m.stage == "DP-SGD step" and m.multiplicity > 1:
        return f"{m.images * m.multiplicity} rows per step"
    return ""


def measurements_table(report: BenchReport) -> str:
    rows = []
    for m in report.measurements:
        timed = m.ok
        rows.append([
            m.stage, m.variant, m.multiplicity if m.stage == "DP-SGD step" else "", m.images,
            f"{m.median_s:.4g} ({min(m.times_s):.4g}-{max(m.times_s):.4g})" if timed else "",
            f"{m.images_per_s:,.4g}" if timed else "", "" if m.ratio is None else f"{m.ratio:.2f}x",
            _mib(m.peak_memory_bytes), _note(m, report),
        ])
    memory = "peak device memory" if report.device.startswith("cuda") else "peak RSS (process)"
    headers = ["stage", "variant", "K", "images/step", "median s (min-max)", "images/s", "vs non-private (per row)", memory, "note"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def projection_table(report: BenchReport) -> str:
    projection = report.projection or []
    missing = [p.stage for p in projection if p.seconds is None]
    rows = [[p.stage, p.work, "" if p.seconds is None else _hours(p.seconds),
             "" if p.published_hours is None else f"{p.published_hours:g}", p.basis] for p in projection]
    total = _hours(sum(p.seconds for p in projection if p.seconds is not None))
    total += f" (without {', '.join(missing)})" if missing else ""
    published = sum(DPIMAGEBENCH_HOURS.values())
    rows.append(["total", "", total, f"{published:g} (these three stages)", ""])
    headers = ["stage", "work at `paper`", "projected h", f"DPImageBench h ({DPIMAGEBENCH_DEVICE})", "time per row from"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


PROJECTION_NOTES = """\
Assumptions: the time per row (one image through the network once) does not depend on the batch;
the paper's physical batches (256 examples x 32 draws) are far larger than a benchmark's, which on a
GPU usually makes each row cheaper, so small `--batch` values overestimate. DP-SGD at multiplicity K
is taken as K times the per-example cost at K = 1 (linear in K), scaled from the largest K measured.
Noise and the optimizer step are counted per physical batch as measured; training adds them once
per logical step. Not projected: PrivImage's query classifier and semantic query, per-epoch
validation and test passes of CA, the membership-inference audit. privbench fine-tunes on its
members (half of the non-validation train images), DPImageBench on all 50,000; DPImageBench's numbers
are from DPImageBench (Chen et al. 2025, arXiv:2503.14681), as quoted in issue 6."""


def render(report: BenchReport) -> str:
    """The report as markdown: provenance, the measurements, and the projection when there is one."""
    o = report.options
    c, h, w = report.shape
    lines = [
        f"## {report.date}: {report.device} ({report.device_name}), preset {o.preset}",
        "",
        f"- command: `{o.command()}`",
        f"- device: {report.device} ({report.device_name})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"- privbench commit: {report.commit or 'unknown (not a git checkout)'}",
        *([] if report.host_load is None else [
            f"- host load (1-minute average) at start / end: {report.host_load[0]:.1f} / {report.host_load[1]:.1f} "
            f"on {os.cpu_count()} logical CPUs (a load at start near the CPU count means other work competed)"]),
        f"- model: the `{o.preset}` diffusion UNet, {report.parameters:,} parameters, on random {c}x{h}x{w} inputs "
        f"with {NUM_CLASSES} classes; physical batch {o.batch}; DP-SGD with noise multiplier "
        f"{BENCH_NOISE_MULTIPLIER:g} and the preset's clip norm; {o.warmup} warm-up + {o.steps} timed steps per row",
        f"- compute: {o.compute()} (privbench/compute.py; bf16 autocasts forward passes, clipping and noise stay float32)",
        "",
        measurements_table(report),
        "",
    ]
    if report.projection is None:
        lines += ["Projection: only for `--preset paper` (it needs the paper's model).", ""]
    else:
        lines += [
            f"### PrivImage at `paper` on CIFAR-10: projected from {report.device} ({report.device_name}) "
            "measurements, not measured end to end",
            "",
            projection_table(report),
            "",
            PROJECTION_NOTES,
            "",
        ]
    return "\n".join(lines)


def append_report(path: Path, text: str) -> Path:
    """Append a section to the perf log, creating it with its header; written atomically, so a crash
    leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    old = path.read_text() if path.exists() else PERF_HEADER
    return write_atomic(path, old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
