"""How `privbench bench` reports: the measurements and the projection as markdown, appended to the
perf log with their provenance."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from tabulate import tabulate

from privbench.bench.measure import BENCH_EPSILON, NUM_CLASSES, BenchReport, Measurement, sampler_rows_per_image
from privbench.bench.projection import DPIMAGEBENCH_DEVICE, DPIMAGEBENCH_HOURS
from privbench.store import write_atomic

PERF_HEADER = """# Performance: `privbench bench`

Throughput of privbench's costly stages on one device, and the `paper` preset's end-to-end cost
projected from it. Every section below was appended by `privbench bench` (default
`--append leaderboards/perf.md`) or, for a GPU check, by `privbench gpu-check score --append`; none is
edited by hand. Each names its date, device, versions,
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
    if m.stage == "Inception features" and report.options.inception_stand_in:
        return f"random weights of the FID network ({report.options.inception_stand_in}): its time, not its features"
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
    published = DPIMAGEBENCH_HOURS.get(report.options.method)
    rows.append(["total", "", total, f"{sum(published.values()):g} (these {len(published)} stages)" if published else "", ""])
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
are DPImageBench's (Chen et al. 2025, arXiv:2503.14681) for PrivImage on CIFAR-10."""


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
        f"with {NUM_CLASSES} classes; physical batch {o.batch}; DP-SGD through the engine's DPSGDPhase, noise "
        f"calibrated to eps {BENCH_EPSILON:g} (any noise costs the same), {o.method}'s clip norm and learning rate; "
        f"{o.warmup} warm-up + {o.steps} timed steps per row",
        f"- compute: {o.compute()} (privbench/compute.py; bf16 autocasts forward passes, clipping and noise stay float32)",
        "",
        measurements_table(report),
        "",
    ]
    if report.projection is None:
        lines += ["Projection: only for `--preset paper` (it needs the paper's model).", ""]
    else:
        lines += [
            f"### {o.method} at `paper` on CIFAR-10: projected from {report.device} ({report.device_name}) "
            "measurements, not measured end to end",
            "",
            projection_table(report),
            "",
            PROJECTION_NOTES,
            "",
        ]
    return "\n".join(lines)


def to_json(report: BenchReport) -> str:
    """The report as JSON, for programs: every field, and each timed stage's median and images/s."""
    timed = [dataclasses.asdict(m) | ({"median_s": m.median_s, "images_per_s": m.images_per_s} if m.ok else {})
             for m in report.measurements]
    return json.dumps(dataclasses.asdict(report) | {"measurements": timed}, indent=1)


def append_report(path: Path, text: str) -> Path:
    """Append a section to the perf log, creating it with its header; written atomically, so a crash
    leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    old = path.read_text() if path.exists() else PERF_HEADER
    return write_atomic(path, old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
