"""What `privbench bench` measures: the throughput of every costly stage of a diffusion method on one device.

One run measures, with the diffusion UNet of a method's preset on random inputs of its dataset's shape:
  - the non-private training step (forward, backward, Adam), as public pre-training runs it;
  - the DP-SGD step of each grad-sample mode on the same model and the same physical batch: the
    engine's own `DPSGDPhase.step` (per-example gradients, clipping, Gaussian noise, Opacus'
    optimizer step, EMA), with its ratio to the non-private step;
  - EDM's Heun sampler, per network call and at the preset's number of sampler steps;
  - Inception-v3 FID features, the way runs compute them (clean resize, then the network);
  - one training step of each CA classifier of the preset;
each with the median and range of its timed steps (warm-up excluded) and its peak memory.
privbench.bench.projection turns them into the `paper` preset's cost; privbench.bench.report prints.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import statistics
import tempfile
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
from torch import nn
from tqdm.auto import tqdm

from privbench.compute import ComputeConfig, autocast, in_layout, lay_out
from privbench.config import PRESETS, build, harness_presets
from privbench.context import RunContext
from privbench.data import DATASETS
from privbench.diffusion.edm import diffusion_loss_fn, edm_sampler, plain_step
from privbench.diffusion.pipeline import EDM, DiffusionConfig, UNetConfig
from privbench.dp import DPSGDPhase, PrivacyLedger
from privbench.dp.sgd import GRAD_SAMPLE_MODES
from privbench.errors import PrivbenchError
from privbench.methods import METHODS, presets
from privbench.metrics.cost import CostRecorder, _cpu_name
from privbench.metrics.inception import load_inception, load_stand_in, network_outputs
from privbench.nets.classifiers import build_classifier
from privbench.nets.unet import build_unet
from privbench.runtime import resolve_device
from privbench.store import commit_id

# The dataset whose shape each preset's UNet is built for: smoke and cpu run on the embedded MNIST
# (smoke's UNet attends at 7x7, i.e. 28 / 4), small and paper on CIFAR-10; the preset's
# data.resolution, where set, replaces the dataset's native one.
PRESET_DATASETS = {"smoke": "mnist", "cpu": "mnist", "small": "cifar10", "paper": "cifar10"}
NUM_CLASSES = 10  # MNIST and CIFAR-10 alike
# The target of the benchmark's own ledger: any sigma > 0 costs the same (Opacus draws one Gaussian
# per parameter whatever its scale), so the value only has to be finite.
BENCH_EPSILON, BENCH_DELTA = 10.0, 1e-5
# Three noise levels are five network calls per image: enough to time one call, cheap on a CPU.
BENCH_SAMPLER_STEPS = 3

@dataclass(frozen=True)
class BenchOptions:
    """What `privbench bench` measures; `batch=None` means the preset's DP physical batch."""

    device: str = "auto"
    preset: str = "paper"
    method: str = "privimage"  # a diffusion method: its UNet, DP-SGD settings and paper workload
    batch: int | None = None
    steps: int = 10
    warmup: int = 2
    modes: tuple[str, ...] = GRAD_SAMPLE_MODES
    multiplicity: int = 1
    precision: str | None = None  # None: the preset's compute.precision
    # A `write_stand_in` file: FID features are timed with random weights of the FID network, where
    # its real weights are not installed. None: the real weights.
    inception_stand_in: str | None = None
    progress: bool = True

    def command(self) -> str:
        """The command line that repeats this measurement, every option spelt out."""
        stand_in = f" --inception-stand-in {self.inception_stand_in}" if self.inception_stand_in else ""
        return (f"privbench bench --device {self.device} --preset {self.preset} --batch {self.batch} "
                f"--steps {self.steps} --warmup {self.warmup} --modes {','.join(self.modes)} "
                f"--multiplicity {self.multiplicity} --precision {self.precision} --method {self.method}{stand_in}")

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
    versions: dict[str, str]
    commit: str | None
    host_load: tuple[float, float] | None  # 1-minute load average at start and end: other work shares the host
    projection: list | None = None  # privbench.bench.projection's stages, at the paper preset
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def measurement(self, stage: str, variant: str = "", multiplicity: int = 1) -> Measurement | None:
        return next((m for m in self.measurements if (m.stage, m.variant, m.multiplicity) == (stage, variant, multiplicity)), None)


# --- presets ----------------------------------------------------------------------------------------


def diffusion_methods() -> list[str]:
    """The methods bench can measure: those training the diffusion UNet with DP-SGD."""
    return [name for name in METHODS.names() if issubclass(METHODS.get(name).Config, DiffusionConfig)]


def method_config(method: str, preset: str) -> DiffusionConfig:
    """`method`'s typed configuration at `preset`."""
    cls = METHODS.get(method)
    return build(cls.Config, presets(cls)[preset], "params.")


def sampler_rows_per_image(steps: int, guidance: float) -> int:
    """Network rows per sampled image: Heun takes 2 * steps - 1 calls; guidance doubles each call's rows."""
    return (2 * steps - 1) * (1 if guidance == 1.0 else 2)


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
    """Non-private training steps, pre-training's own `plain_step` (mean loss, backward, Adam)."""
    model = lay_out(copy.deepcopy(model), compute).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = [in_layout(t, compute) for t in batch]
    yield lambda: plain_step(model, optimizer, loss_fn, batch, compute)


@contextmanager
def dp_steps(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss_fn, mode: str, multiplicity: int,
             clip_norm: float, lr: float, compute: ComputeConfig, steps: int) -> Iterator[Callable[[], None]]:
    """`steps` noisy steps of training's own DPSGDPhase, each on the whole batch as one physical batch.

    The phase keeps a ledger of its own (a benchmark touches no members) whose target only makes the
    noise non-zero; it checks on exit that all `steps` were taken.
    """
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as scratch:
        ctx = RunContext(Path(scratch), Path(scratch), device, seed=0, progress=False, compute=compute)
        phase = DPSGDPhase(copy.deepcopy(model), batch, PrivacyLedger(BENCH_EPSILON, BENCH_DELTA), ctx,
                           name="bench-dp-sgd", logical_batch=len(batch[0]), physical_batch=len(batch[0]),
                           steps=steps, clip_norm=clip_norm, lr=lr, multiplicity=multiplicity, grad_sample_mode=mode)
        with phase:
            yield lambda: phase.step(loss_fn, batch)


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
def inception_steps(images: np.ndarray, device: torch.device, stand_in: str | None) -> Iterator[Callable[[], np.ndarray]]:
    """FID features as runs compute them (the device's default chunk: privbench.metrics.inception.BATCH_SIZES),
    with the real weights or, from a stand-in file, random ones of the same network."""
    model = load_inception(device) if stand_in is None else load_stand_in(Path(stand_in), device)
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
    if options.method not in diffusion_methods():
        raise PrivbenchError(f"bench measures the diffusion methods' UNet; --method {options.method!r} is not one of: "
                             f"{', '.join(diffusion_methods())}")
    batch = options.batch if options.batch is not None else method_config(options.method, options.preset).dp.physical_batch
    if batch < 2:
        raise PrivbenchError(f"--batch must be at least 2 (the CA classifiers' BatchNorm needs two images), got {batch}")
    if options.steps < 1 or options.warmup < 0:
        raise PrivbenchError(f"--steps must be >= 1 and --warmup >= 0, got {options.steps} and {options.warmup}")
    if options.multiplicity < 1:
        raise PrivbenchError(f"--multiplicity must be >= 1, got {options.multiplicity}")
    if options.inception_stand_in is not None and not Path(options.inception_stand_in).is_file():
        raise PrivbenchError(f"--inception-stand-in {options.inception_stand_in} is not a file: write one with "
                             "`privbench gpu-check prepare`, or leave the option out to time the real weights")
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


def measure_stages(options: BenchOptions) -> BenchReport:
    """Measure every stage on `options.device` (options resolved by `resolve_options`)."""
    device = resolve_device(options.device)
    load_at_start = _load_average()
    config = method_config(options.method, options.preset)
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
                dp_steps, model, batch, loss_fn, mode, multiplicity, config.dp.clip_norm, config.dp.lr, compute,
                options.warmup + options.steps))
            ratio = dp.seconds_per_row / plain.seconds_per_row if dp.ok and plain.ok else None
            measurements.append(replace(dp, ratio=ratio))
    guidance = config.sampler.guidance
    measurements.append(run(
        Measurement("sampling", f"{BENCH_SAMPLER_STEPS} steps", calls=sampler_rows_per_image(BENCH_SAMPLER_STEPS, guidance)),
        functools.partial(sampling_steps, model, batch[1], shape, BENCH_SAMPLER_STEPS, guidance, compute),
    ))
    uint8_images = np.random.default_rng(0).integers(0, 256, (options.batch, shape[1], shape[2], shape[0]), dtype=np.uint8)
    measurements.append(run(Measurement("Inception features"),
                            functools.partial(inception_steps, uint8_images, device, options.inception_stand_in)))
    evaluation = harness_presets()[options.preset]["eval"]
    for name in evaluation["ca_classifiers"]:
        measurements.append(run(Measurement("CA classifier step", name),
                                functools.partial(classifier_steps, name, batch[0], batch[1], evaluation["ca_lr"])))
    return BenchReport(
        options=options, device=str(device), device_name=device_name(device), shape=shape,
        parameters=sum(p.numel() for p in model.parameters()), sampler_steps=config.sampler.steps,
        sampler_guidance=config.sampler.guidance, measurements=measurements,
        versions=versions(device), commit=commit_id(),
        host_load=None if load_at_start is None else (load_at_start, _load_average()),
    )
