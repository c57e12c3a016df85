"""Leaderboards from the results database: per dataset, methods by (epsilon x metric)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from tabulate import tabulate

from privbench.errors import PrivbenchError
from privbench.metrics.names import (
    EPS_LB, EPS_LB_CANARY, FD_DINOV2, MEMORISATION, MEMORISATION_HIGH, MEMORISATION_LOW, TPR, TPR_HIGH, TPR_LOW,
)

# metric column -> (header, scale, decimals); CA is stored as a fraction and shown in percent.
METRICS = {"fid": ("FID", 1.0, 1), "ca": ("CA %", 100.0, 1), TPR: ("TPR@10%FPR", 1.0, 3), EPS_LB: ("ε_lb", 1.0, 2)}
# How the other metrics show when `--metrics` asks for them (per-class ones as their metric: ca/3 as ca);
# a metric not named here shows under its own name with 3 decimals.
OTHER_METRICS = {
    "precision": ("precision", 1.0, 3), "recall": ("recall", 1.0, 3), "kid": ("KID", 1.0, 4), "kid_std": ("KID std", 1.0, 4),
    "density": ("density", 1.0, 3), "coverage": ("coverage", 1.0, 3), MEMORISATION: ("memorised %", 100.0, 1),
    FD_DINOV2: ("FD_DINOv2", 1.0, 1), "ca_std": ("CA std", 100.0, 1), "ca_noisy": ("CA noisy %", 100.0, 1),
    "ca_oracle": ("CA oracle %", 100.0, 1), "is": ("IS", 1.0, 2),
}  # fmt: skip
# Marks an empirical lower bound above the ledger's epsilon: the accounting, or the code spending it, is wrong.
ACCOUNTING_FAILURE = " (ε_lb > ε: accounting failure)"
# Marks the spent epsilon of runs whose mechanisms drew their randomness from the OS (privacy.randomness: os).
OS_RANDOMNESS, OS_RANDOMNESS_NOTE = " †", "† noise from OS entropy: not reproducible bit for bit"
FORMATS = ("md", "csv", "latex")
HARNESS_STAGES = ("sample", "fid", "ca", "audit", "rescore")  # the stages after fit, in the order a run does them
DP_SGD_STAGE = "dp-train"  # the DP-SGD phase of the methods that have one (privbench.diffusion.pipeline)
# The per-run columns of the machine-readable CSV: what a regression check compares.
CELL_KEYS = ("dataset", "method", "preset", "seed", "target_epsilon")
CELL_VALUES = ("epsilon", "fid", "precision", "recall", "ca", "ca_std", "ca_noisy", "ca_oracle", TPR, EPS_LB)
# Scores added later: a committed CSV written before one existed lacks its column (privbench.report.regression).
CELL_SCORES = ("kid", "kid_std", "density", "coverage", MEMORISATION, FD_DINOV2)
# What a board built from cells alone (privbench.report.sources) needs besides: identity, intervals, provenance.
CELL_EXTRAS = (TPR_LOW, TPR_HIGH, MEMORISATION_LOW, MEMORISATION_HIGH, "run_id", "delta", "randomness", "commit_id", "device")


def is_canary_run(runs: pd.DataFrame) -> pd.Series:
    """Which runs are canary runs (privbench.attacks.canaries): trained with canaries, never scored,
    so left out of every leaderboard and shown in the canary audit table (report/canary_table.py)."""
    return runs[EPS_LB_CANARY].notna() if EPS_LB_CANARY in runs else pd.Series(False, index=runs.index)


def format_cell(values: pd.Series, scale: float, decimals: int) -> str:
    values = values.dropna() * scale
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.{decimals}f}"
    return f"{values.mean():.{decimals}f} ± {values.std(ddof=1):.{decimals}f}"


def format_eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def leaderboard(runs: pd.DataFrame, dataset: str, metrics: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows = method (and preset), columns = target epsilon x {FID, CA, TPR@10%FPR, ε_lb, `metrics`,
    epsilon spent}.

    Cells are the mean ± sample standard deviation over seeds. "ε spent" is the composed epsilon
    the ledger recorded (the maximum over seeds), which is what a reader may rely on. TPR@10%FPR is
    the strongest attack's (with its bootstrap 95% interval for a single seed) and ε_lb the largest
    empirical lower bound (see privbench.attacks.audit); a lower bound above the spent epsilon is
    flagged in its cell, and a spent epsilon with noise from the OS is marked (OS_RANDOMNESS).
    """
    runs = runs[runs["dataset"] == dataset].assign(os_randomness=os_randomness)
    if runs.empty:
        raise PrivbenchError(f"no finished runs on dataset {dataset!r} in the database: run `privbench run` first")
    rows = []
    for (method, preset), group in runs.groupby(["method", "preset"], sort=True):
        row = {"method": method, "preset": preset, "seeds": int(group["seed"].nunique())}
        for target, cell in group.groupby("target_epsilon", sort=True):
            for name in dict.fromkeys([*METRICS, *metrics]):
                if name in cell:
                    header, scale, decimals = metric_format(name)
                    row[f"ε={format_eps(target)} {header}"] = format_cell(cell[name], scale, decimals)
            if len(cell) == 1 and TPR_LOW in cell and cell[TPR_LOW].notna().all():
                low, high = cell[TPR_LOW].iloc[0], cell[TPR_HIGH].iloc[0]
                row[f"ε={format_eps(target)} TPR@10%FPR"] += f" [{low:.3f}, {high:.3f}]"
            if EPS_LB in cell and (cell[EPS_LB] > cell["epsilon"]).any():
                row[f"ε={format_eps(target)} ε_lb"] += ACCOUNTING_FAILURE
            row[f"ε={format_eps(target)} spent"] = format_eps(round(float(cell["epsilon"].max()), 3))
            if cell["os_randomness"].any():
                row[f"ε={format_eps(target)} spent"] += OS_RANDOMNESS
        rows.append(row)
    return pd.DataFrame(rows).fillna("-")


def os_randomness(runs: pd.DataFrame) -> pd.Series:
    """Whether each run's mechanisms drew from the OS's entropy: a cell's `randomness` column, else its
    config's privacy.randomness (runs recorded before the setting existed drew seeded)."""
    from_config = runs["config"] if "config" in runs else pd.Series(np.nan, index=runs.index)
    stated = runs["randomness"] if "randomness" in runs else pd.Series(np.nan, index=runs.index)
    return pd.Series([
        said == "os" if isinstance(said, str) else
        isinstance(text, str) and json.loads(text).get("privacy", {}).get("randomness") == "os"
        for said, text in zip(stated, from_config)
    ], index=runs.index, dtype=bool)


def cost_table(runs: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """Rows = runs (method, preset, epsilon, seed), columns = wall seconds per stage in the order the
    stages ran, DP-SGD's share of the method's own stages, the total of the work done in this run,
    peak host memory and the generator's size. Work taken from a cache shows its original cost marked
    "reused" and is left out of the total; the share counts it at that original cost, which is what
    the stage costs a run that does not find it cached."""
    costs = costs[costs["run_id"].isin(runs["run_id"])]
    # The methods' own stages (fit, query, pre-training, DP training) first, then the harness's.
    harness = [s for s in HARNESS_STAGES if s in set(costs["stage"])]
    stages = [s for s in dict.fromkeys(costs["stage"]) if s not in HARNESS_STAGES] + harness
    rows = []
    for _, run in runs.sort_values(["method", "preset", "target_epsilon", "seed"]).iterrows():
        mine = costs[costs["run_id"] == run["run_id"]].set_index("stage")
        row = {"method": run["method"], "preset": run["preset"], "ε": format_eps(run["target_epsilon"]), "seed": run["seed"]}
        for stage in stages:
            row[f"{stage} s"] = "-" if stage not in mine.index else (
                f"{mine.at[stage, 'wall_s']:.0f}" + (" (reused)" if mine.at[stage, "reused"] else ""))
        fit = mine.loc[~mine.index.isin(HARNESS_STAGES), "wall_s"]
        row["DP-SGD % of fit"] = f"{100 * fit[DP_SGD_STAGE] / fit.sum():.0f}" if DP_SGD_STAGE in fit.index else "-"
        fresh = mine[mine["reused"] == 0]
        row["total s"] = f"{fresh['wall_s'].sum():.0f}"
        row["peak host GiB"] = f"{mine['peak_host_bytes'].max() / 2**30:.1f}" if mine["peak_host_bytes"].notna().any() else "-"
        generator = mine.loc[mine.index.isin(["sample"]), "params"]
        row["generator params"] = f"{int(generator.iloc[0]):,}" if len(generator) and generator.notna().all() else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def provenance(runs: pd.DataFrame) -> str:
    commits = ", ".join(sorted({c for c in runs["commit_id"].dropna()})) or "unknown"
    devices = ", ".join(sorted({d for d in runs["device"].dropna()})) or "unknown"
    configs = ", ".join(sorted(set(runs["config_hash"])))
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"commit {commits}; config hashes {configs}; device {devices}; delta {_deltas(runs)}; generated {date}"


def _deltas(runs: pd.DataFrame) -> str:
    return ", ".join(f"{d:g}" for d in np.unique(runs["delta"].dropna())) or "unknown"


def cells(runs: pd.DataFrame, metrics: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run with every headline number and score at full precision (and `metrics`, e.g.
    per-class ones), plus the config hash and commit: the machine-readable form of a leaderboard,
    which `privbench check --against` compares."""
    table = runs[~is_canary_run(runs)].copy()
    table["randomness"] = np.where(os_randomness(table), "os", "seeded")
    values = list(dict.fromkeys([*CELL_VALUES, *CELL_SCORES, *metrics]))
    for name in (*values, *CELL_EXTRAS):
        if name not in table:
            table[name] = np.nan
    columns = [*CELL_KEYS, "config_hash", *values, *CELL_EXTRAS]
    return table[columns].sort_values(list(CELL_KEYS)).reset_index(drop=True)


def check_metrics(runs: pd.DataFrame, metrics: tuple[str, ...]) -> None:
    """Refuse a metric that no run holds, naming those they do."""
    if unknown := [m for m in metrics if m not in runs or runs[m].isna().all()]:
        held = sorted(c for c in runs.columns if c in METRICS or c in OTHER_METRICS or "/" in c)
        raise PrivbenchError(f"no run has the metric(s) {', '.join(unknown)}: choose from {', '.join(held)}")


def metric_format(name: str) -> tuple[str, float, int]:
    """(header, scale, decimals) of a metric column; a per-class score (ca/3) as its metric, headed by its name."""
    family, _, class_name = name.partition("/")
    header, scale, decimals = METRICS.get(family) or OTHER_METRICS.get(family) or (family, 1.0, 3)
    return (f"{header} [{class_name}]" if class_name else header), scale, decimals


def render(runs: pd.DataFrame, fmt: str = "md", datasets: list[str] | None = None, costs: pd.DataFrame | None = None,
           notes: Callable[[pd.DataFrame], list[str]] | None = None, metrics: tuple[str, ...] = ()) -> str:
    """The leaderboard of each dataset in md or latex, with `metrics` beside the headline numbers, each
    with its provenance, the sentences `notes` makes of its runs (privbench.report.findings) and,
    given the `costs`, a cost table under it; csv gives `cells`."""
    if fmt not in FORMATS:
        raise PrivbenchError(f"unknown table format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    runs = runs[~is_canary_run(runs)]
    if runs.empty:
        raise PrivbenchError("the results database has no finished runs: run `privbench run` first")
    check_metrics(runs, metrics)
    datasets = datasets or sorted(runs["dataset"].unique())
    if fmt == "csv":
        for dataset in datasets:
            leaderboard(runs, dataset)  # the same error as md for a dataset without runs
        return cells(runs[runs["dataset"].isin(datasets)], metrics).to_csv(index=False)
    parts = []
    for dataset in datasets:
        body = tabulate(
            leaderboard(runs, dataset, metrics), headers="keys", showindex=False,
            tablefmt="github" if fmt == "md" else "latex_booktabs",
        )
        note = provenance(runs[runs["dataset"] == dataset])
        if os_randomness(runs[runs["dataset"] == dataset]).any():
            body += f"\n\n{OS_RANDOMNESS_NOTE}" if fmt == "md" else f"\n% {OS_RANDOMNESS_NOTE}"
        parts.append(f"### {dataset}\n\n{body}\n\n_{note}_\n" if fmt == "md" else f"% {dataset}\n{body}\n% {note}\n")
        if notes and (sentences := notes(runs[runs["dataset"] == dataset])):
            parts.append(f"#### {dataset}: findings\n\n" + "".join(f"- {s}\n" for s in sentences) if fmt == "md"
                         else "".join(f"% {s}\n" for s in sentences))
        if costs is not None and costs["run_id"].isin(runs.loc[runs["dataset"] == dataset, "run_id"]).any():
            table = tabulate(cost_table(runs[runs["dataset"] == dataset], costs), headers="keys", showindex=False,
                             tablefmt="github" if fmt == "md" else "latex_booktabs", disable_numparse=True)
            title = f"{dataset}: cost per stage, wall seconds (reused: taken from the cache, shown with its original cost)"
            parts.append(f"#### {title}\n\n{table}\n" if fmt == "md" else f"% {title}\n{table}\n")
    return "\n".join(parts)
