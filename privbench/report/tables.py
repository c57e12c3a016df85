"""Leaderboards from the results database: per dataset, methods by (epsilon x metric)."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from tabulate import tabulate

from privbench.errors import PrivbenchError

# metric column -> (header, scale, decimals); CA is stored as a fraction and shown in percent.
METRICS = {"fid": ("FID", 1.0, 1), "ca": ("CA %", 100.0, 1), "mia_tpr@0.1": ("TPR@10%FPR", 1.0, 3), "eps_lb": ("ε_lb", 1.0, 2)}
# Marks an empirical lower bound above the ledger's epsilon: the accounting, or the code spending it, is wrong.
ACCOUNTING_FAILURE = " (ε_lb > ε: accounting failure)"
FORMATS = ("md", "csv", "latex")


def _cell(values: pd.Series, scale: float, decimals: int) -> str:
    values = values.dropna() * scale
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.{decimals}f}"
    return f"{values.mean():.{decimals}f} ± {values.std(ddof=1):.{decimals}f}"


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def leaderboard(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Rows = method (and preset), columns = target epsilon x {FID, CA, TPR@10%FPR, ε_lb, epsilon spent}.

    Cells are the mean ± sample standard deviation over seeds. "ε spent" is the composed epsilon
    the ledger recorded (the maximum over seeds), which is what a reader may rely on. TPR@10%FPR is
    the strongest attack's (with its bootstrap 95% interval for a single seed) and ε_lb the largest
    empirical lower bound (see privbench.attacks.audit); a lower bound above the spent epsilon is
    flagged in its cell.
    """
    runs = runs[runs["dataset"] == dataset]
    if runs.empty:
        raise PrivbenchError(f"no finished runs on dataset {dataset!r} in the database: run `privbench run` first")
    rows = []
    for (method, preset), group in runs.groupby(["method", "preset"], sort=True):
        row = {"method": method, "preset": preset, "seeds": int(group["seed"].nunique())}
        for target, cell in group.groupby("target_epsilon", sort=True):
            for name, (header, scale, decimals) in METRICS.items():
                if name in cell:
                    row[f"ε={_eps(target)} {header}"] = _cell(cell[name], scale, decimals)
            if len(cell) == 1 and "mia_tpr@0.1_low" in cell and cell["mia_tpr@0.1_low"].notna().all():
                low, high = cell["mia_tpr@0.1_low"].iloc[0], cell["mia_tpr@0.1_high"].iloc[0]
                row[f"ε={_eps(target)} TPR@10%FPR"] += f" [{low:.3f}, {high:.3f}]"
            if "eps_lb" in cell and (cell["eps_lb"] > cell["epsilon"]).any():
                row[f"ε={_eps(target)} ε_lb"] += ACCOUNTING_FAILURE
            row[f"ε={_eps(target)} spent"] = _eps(round(float(cell["epsilon"].max()), 3))
        rows.append(row)
    return pd.DataFrame(rows).fillna("-")


def provenance(runs: pd.DataFrame) -> str:
    commits = ", ".join(sorted({c for c in runs["commit_id"].dropna()})) or "unknown"
    devices = ", ".join(sorted({d for d in runs["device"].dropna()})) or "unknown"
    configs = ", ".join(sorted(set(runs["config_hash"])))
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"commit {commits}; config hashes {configs}; device {devices}; delta {_deltas(runs)}; generated {date}"


def _deltas(runs: pd.DataFrame) -> str:
    return ", ".join(f"{d:g}" for d in np.unique(runs["delta"]))


def render(runs: pd.DataFrame, fmt: str = "md", datasets: list[str] | None = None) -> str:
    """The leaderboard of each dataset in `fmt` (md, csv or latex), each with its provenance."""
    if fmt not in FORMATS:
        raise PrivbenchError(f"unknown table format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if runs.empty:
        raise PrivbenchError("the results database has no finished runs: run `privbench run` first")
    datasets = datasets or sorted(runs["dataset"].unique())
    if fmt == "csv":
        return pd.concat([leaderboard(runs, d).assign(dataset=d) for d in datasets]).fillna("-").to_csv(index=False)
    parts = []
    for dataset in datasets:
        body = tabulate(
            leaderboard(runs, dataset), headers="keys", showindex=False,
            tablefmt="github" if fmt == "md" else "latex_booktabs",
        )
        note = provenance(runs[runs["dataset"] == dataset])
        parts.append(f"### {dataset}\n\n{body}\n\n_{note}_\n" if fmt == "md" else f"% {dataset}\n{body}\n% {note}\n")
    return "\n".join(parts)
