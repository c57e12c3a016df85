"""Figures from stored results: metric against epsilon per method, and the sample grids side by side.

Figures are drawn on their own Agg canvas (no pyplot), so they render the same headless, in tests
and under any backend a caller has chosen, and return PNG bytes for `write_atomic`.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from PIL import Image

from privbench.errors import PrivbenchError
from privbench.report.tables import format_eps
from privbench.store import write_atomic

# metric column -> (axis label, scale); CA is stored as a fraction and shown in percent.
AXES = {"fid": ("FID (lower is better)", 1.0), "ca": ("CA % (higher is better)", 100.0)}
INF_OFFSET = 4.0  # eps=inf sits this factor right of the largest finite epsilon on the log axis


def metric_vs_epsilon(runs: pd.DataFrame, dataset: str, metric: str) -> bytes:
    """PNG of `metric` against target epsilon, one line per method and preset: mean over seeds,
    with the standard deviation over seeds as error bars where there is more than one seed."""
    if metric not in AXES:
        raise PrivbenchError(f"no plot for metric {metric!r}; choose one of: {', '.join(AXES)}")
    runs = _of(runs, dataset)
    label, scale = AXES[metric]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    finite = sorted({e for e in runs["target_epsilon"] if not math.isinf(e)})
    inf_at = (finite[-1] if finite else 1.0) * INF_OFFSET
    values = runs.dropna(subset=[metric]) if metric in runs else runs.iloc[0:0]
    for (method, preset), group in values.groupby(["method", "preset"], sort=True):
        stats = (group[metric] * scale).groupby(group["target_epsilon"]).agg(["mean", "std"])  # std: NaN for one seed
        x = [inf_at if math.isinf(e) else e for e in stats.index]
        ax.errorbar(x, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=f"{method} ({preset})")
    ax.set_xscale("log")
    has_inf = any(math.isinf(e) for e in runs["target_epsilon"])
    ax.set_xticks(finite + [inf_at] * has_inf, [format_eps(e) for e in finite] + ["∞"] * has_inf)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("target ε (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{dataset}: {label.split(' (')[0]} vs ε, preset {', '.join(sorted(runs['preset'].unique()))}")
    if values.empty:
        ax.text(0.5, 0.5, f"no {metric} recorded", transform=ax.transAxes, ha="center", va="center")
    else:
        ax.legend()
        ax.grid(alpha=0.3)
    return _png(fig)


def sample_sheet(runs: pd.DataFrame, dataset: str) -> bytes:
    """PNG of the runs' samples.png, methods (with preset) as rows and target epsilons as columns;
    of several seeds the lowest with a samples.png is shown, and a cell with none says so."""
    runs = _of(runs, dataset).sort_values("seed")
    rows = sorted(set(zip(runs["method"], runs["preset"])))
    epsilons = sorted(runs["target_epsilon"].unique())
    fig = Figure(figsize=(2.6 * len(epsilons) + 1, 2.6 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), len(epsilons), squeeze=False)
    for (i, (method, preset)), (j, epsilon) in ((r, c) for r in enumerate(rows) for c in enumerate(epsilons)):
        ax = axes[i, j]
        ax.set_xticks([])
        ax.set_yticks([])
        cell = runs[(runs["method"] == method) & (runs["preset"] == preset) & (runs["target_epsilon"] == epsilon)]
        grids = cell["samples_png"] if "samples_png" in cell else [Path(d) / "samples.png" for d in cell["run_dir"]]
        shown = [(seed, path) for seed, path in zip(cell["seed"], map(Path, grids)) if path.is_file()]
        if shown:
            ax.imshow(np.asarray(Image.open(shown[0][1]).convert("RGB")))
            ax.set_xlabel(f"seed {shown[0][0]}", fontsize=8)
        else:
            note = "no run" if cell.empty else f"samples.png missing\n({len(cell)} run{'s' * (len(cell) > 1)})"
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=8)
        if i == 0:
            ax.set_title(f"ε={'∞' if math.isinf(epsilon) else format_eps(epsilon)}")
        if j == 0:
            ax.set_ylabel(f"{method}\n({preset})")
    fig.suptitle(f"{dataset}: synthetic samples, method (rows) by target ε (columns)")
    return _png(fig)


def write_plots(runs: pd.DataFrame, directory: str | Path) -> list[Path]:
    """Per dataset: fid_vs_eps_<dataset>.png, ca_vs_eps_<dataset>.png and samples_<dataset>.png
    under `directory`, each written atomically; returns their paths."""
    if runs.empty:
        raise PrivbenchError("the results database has no finished runs: run `privbench run` first")
    directory = Path(directory)
    paths = []
    for dataset in sorted(runs["dataset"].unique()):
        for metric in AXES:
            paths.append(write_atomic(directory / f"{metric}_vs_eps_{dataset}.png", metric_vs_epsilon(runs, dataset, metric)))
        paths.append(write_atomic(directory / f"samples_{dataset}.png", sample_sheet(runs, dataset)))
    return paths


def _of(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    runs = runs[runs["dataset"] == dataset]
    if runs.empty:
        raise PrivbenchError(f"no finished runs on dataset {dataset!r} in the database: run `privbench run` first")
    return runs


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()
