"""The `paper` preset's end-to-end cost of a diffusion method, projected from `privbench bench`'s
measurements: each stage's rows at the paper preset times the measured seconds per row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privbench.bench.measure import NUM_CLASSES, BenchReport, Measurement, method_config, sampler_rows_per_image
from privbench.config import harness_presets
from privbench.data import make_split
from privbench.dp.sgd import steps_for

# CIFAR-10's official split (Krizhevsky 2009): 5,000 train images per class, 10,000 test images.
CIFAR10_TRAIN_PER_CLASS = 5_000
CIFAR10_TEST = 10_000
# DPImageBench (Chen et al. 2025, arXiv:2503.14681): PrivImage on CIFAR-10, its 3.8M-parameter UNet on
# 4x RTX A6000 Ada, in hours per stage. DPImageBench fine-tunes on all 50,000 train images. No
# per-stage hours of the other methods are at hand: their column stays empty.
DPIMAGEBENCH_HOURS = {"privimage": {"pre-training": 32.0, "DP-SGD fine-tuning": 20.5, "sampling": 0.17}}
DPIMAGEBENCH_DEVICE = "4x RTX A6000 Ada"


@dataclass(frozen=True)
class StageProjection:
    stage: str
    work: str  # what the stage computes at the paper preset, in rows
    basis: str  # which measurement the time per row comes from
    seconds: float | None  # None: not projected (its measurement failed or does not exist)
    published_hours: float | None = None


@dataclass(frozen=True)
class PaperWorkload:
    """What a diffusion method computes at the `paper` preset on CIFAR-10, stage by stage."""

    method: str
    members: int
    epochs: float
    logical_batch: int
    multiplicity: int
    grad_sample_mode: str
    pretrain_steps: int  # 0: the method trains from scratch (DPDM)
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
        """Noisy steps, as `DPSGDPhase` counts them from epochs."""
        return steps_for(self.epochs, self.logical_batch / self.members)

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


def paper_workload(method: str) -> PaperWorkload:
    """`method`'s workload at the `paper` preset, read from its presets and privbench's CIFAR-10 split."""
    config = method_config(method, "paper")
    harness = harness_presets()["paper"]
    evaluation = harness["eval"]
    labels = np.repeat(np.arange(NUM_CLASSES), CIFAR10_TRAIN_PER_CLASS)
    members = len(make_split(labels, seed=0, validation_fraction=harness["data"]["validation_fraction"],
                             non_members=harness["data"].get("non_members")).members)
    pretrain = getattr(config, "pretrain", None)
    return PaperWorkload(
        method=method, members=members, epochs=config.dp.epochs, logical_batch=config.dp.logical_batch,
        multiplicity=config.dp.multiplicity, grad_sample_mode=config.dp.grad_sample_mode,
        pretrain_steps=pretrain.steps if pretrain else 0, pretrain_batch=pretrain.batch_size if pretrain else 0,
        samples=evaluation["samples"], sampler_steps=config.sampler.steps, guidance=config.sampler.guidance,
        fid_samples=evaluation["fid_samples"], fid_reference=evaluation["fid_reference"] or CIFAR10_TEST,
        ca_classifiers=tuple(evaluation["ca_classifiers"]), ca_epochs=evaluation["ca_epochs"],
    )


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
    """Seconds per stage of `w.method` at `w`, each = rows of the stage x measured seconds per row.

    Assumptions, printed with the table: time per row does not depend on the batch (the paper's
    physical batches are larger than a benchmark's, which on a GPU usually makes each row cheaper);
    a DP-SGD step at multiplicity K costs K times one at K = 1 per example (linear in K), scaled
    from the largest K measured; noise and the optimizer step are charged per physical batch as
    measured although training adds them once per logical step.
    """
    published = DPIMAGEBENCH_HOURS.get(w.method, {})
    ca = [costs.classifiers.get(name) for name in w.ca_classifiers]
    ca_seconds = None if any(m is None for m in ca) else sum(w.ca_images * m.seconds_per_row for m in ca)
    ca_basis = "; ".join(_basis(m, f"{name} step") for name, m in zip(w.ca_classifiers, ca))
    pretraining = [] if not w.pretrain_steps else [StageProjection(
        "pre-training", f"{w.pretrain_steps:,} Adam steps x {w.pretrain_batch} = {w.pretrain_rows:,} rows",
        _basis(costs.plain, "non-private step"), _seconds(w.pretrain_rows, costs.plain), published.get("pre-training"))]
    return [
        *pretraining,
        StageProjection("DP-SGD fine-tuning",
                        f"{w.dp_steps:,} noisy steps (q = {w.logical_batch}/{w.members:,}, {w.epochs:g} epochs) x "
                        f"{w.logical_batch} examples x K = {w.multiplicity} = {w.dp_rows:,} rows",
                        _basis(costs.dp, f"DP-SGD step {w.grad_sample_mode}"),
                        _seconds(w.dp_rows, costs.dp), published.get("DP-SGD fine-tuning")),
        StageProjection("sampling", f"{w.samples:,} images x {sampler_rows_per_image(w.sampler_steps, w.guidance)} network "
                        f"calls ({w.sampler_steps} Heun steps) = {w.sampler_rows:,} rows",
                        _basis(costs.sampler, "sampling"), _seconds(w.sampler_rows, costs.sampler),
                        published.get("sampling")),
        StageProjection("FID features", f"{w.fid_samples:,} samples + {w.fid_reference:,} reference images",
                        _basis(costs.inception, "Inception features"), _seconds(w.fid_images, costs.inception)),
        StageProjection("CA training", f"{len(w.ca_classifiers)} classifiers x {w.ca_epochs} epochs x {w.samples:,} images",
                        ca_basis, ca_seconds),
    ]
