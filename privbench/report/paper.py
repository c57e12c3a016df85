"""Published numbers next to privbench's: a reader sees at a glance how far a reimplementation is from
the paper it follows, with both sides' provenance under each table.

Published tables live in leaderboards/paper/<name>.csv, one number per row (dataset, method,
epsilon, metric, value, source), CA in percent as published; every row cites the table it was read from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

import privbench
from privbench.errors import PrivbenchError
from privbench.report.tables import FORMATS, METRICS, format_cell, format_eps, provenance

PAPER_DIR = Path(privbench.__file__).parents[1] / "leaderboards" / "paper"
PAPERS = tuple(sorted(path.stem for path in PAPER_DIR.glob("*.csv")))
COLUMNS = ("dataset", "method", "epsilon", "metric", "value", "source")
PUBLISHED_METRICS = ("fid", "ca")  # the order of a block's columns, too


def load_published(name_or_path: str | Path) -> pd.DataFrame:
    """The published table `name_or_path` (a name in PAPERS or a CSV path), checked row by row, so
    that a typo in a hand-copied number fails loudly instead of landing in a comparison."""
    path = Path(name_or_path)
    if path.suffix != ".csv":
        if str(name_or_path) not in PAPERS:
            choices = ", ".join(PAPERS) or "none"
            raise PrivbenchError(f"unknown paper {str(name_or_path)!r}: choose one of {choices} (in {PAPER_DIR}) or pass a CSV path")
        path = PAPER_DIR / f"{name_or_path}.csv"
    if not path.is_file():
        raise PrivbenchError(f"no published table at {path}: pass an existing CSV with columns {','.join(COLUMNS)}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PrivbenchError(f"{path} is not a readable CSV ({str(e).strip()}): fix the file") from e
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise PrivbenchError(f"{path} lacks the column(s) {', '.join(missing)}: its header must be {','.join(COLUMNS)}")
    table = table[list(COLUMNS)].apply(lambda column: column.str.strip())
    for column in COLUMNS:
        _check(path, table, table[column] == "", f"an empty {column}")
    _check(path, table, ~table["metric"].isin(PUBLISHED_METRICS), f"a metric other than {' or '.join(PUBLISHED_METRICS)}")
    for column in ("epsilon", "value"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        _check(path, table, numbers.isna(), f"a non-numeric {column}")
        table[column] = numbers.astype(float)
    _check(path, table, table.duplicated(["dataset", "method", "epsilon", "metric"], keep=False), "a repeated cell")
    return table


def _check(path: Path, table: pd.DataFrame, bad: pd.Series, what: str) -> None:
    if bad.any():
        line = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # 1-based, after the header
        row = ",".join(table.iloc[line - 2].astype(str))
        raise PrivbenchError(f"{path} line {line} has {what} ({row}): correct that row")


def side_by_side(runs: pd.DataFrame | None, published: pd.DataFrame, fmt: str = "md") -> str:
    """Per dataset of `published`: rows = methods (privbench's with their preset), and for each
    published (epsilon, metric) a privbench column (mean ± std over seeds) and a published column.

    `runs` is `Store.runs()`; a dataset privbench has no runs on still shows the published numbers.
    None (no results database, as on a fresh clone) shows the published numbers alone.
    """
    if fmt not in FORMATS:
        raise PrivbenchError(f"unknown table format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if published.empty:
        raise PrivbenchError("the published table has no rows: add cited numbers to its CSV or choose another paper")
    blocks = []
    for dataset in sorted(published["dataset"].unique()):
        ours = None if runs is None else runs[runs["dataset"] == dataset]
        theirs = published[published["dataset"] == dataset]
        blocks.append((dataset, _comparison(ours, theirs), _note(dataset, ours, theirs)))
    if fmt == "csv":
        return pd.concat([table.assign(dataset=d, provenance=note) for d, table, note in blocks]).to_csv(index=False)
    parts = []
    for dataset, table, note in blocks:
        body = tabulate(  # no number parsing: it would print a published 81.0 as 81
            table, headers="keys", showindex=False, disable_numparse=True,
            tablefmt="github" if fmt == "md" else "latex_booktabs",
        )
        parts.append(f"### {dataset}\n\n{body}\n\n_{note}_\n" if fmt == "md" else f"% {dataset}\n{body}\n% {note}\n")
    return "\n".join(parts)


def _comparison(ours: pd.DataFrame | None, theirs: pd.DataFrame) -> pd.DataFrame:
    """The rows of one dataset; without privbench's runs (`ours` None), its published columns alone."""
    cells = sorted(set(zip(theirs["epsilon"], theirs["metric"])), key=lambda c: (c[0], PUBLISHED_METRICS.index(c[1])))
    values = theirs.set_index(["method", "epsilon", "metric"])["value"]
    rows = []
    for method in sorted(set(theirs["method"]) | (set() if ours is None else set(ours["method"]))):
        mine = None if ours is None else ours[ours["method"] == method]
        groups = [] if mine is None else [(f"{method} ({p})", g) for p, g in mine.groupby("preset", sort=True)]
        for label, group in groups or [(method, mine)]:
            row = {"method": label}
            for epsilon, metric in cells:
                header, scale, decimals = METRICS[metric]
                if group is not None:
                    at = group[np.isclose(group["target_epsilon"].astype(float), epsilon)]
                    row[f"ε={format_eps(epsilon)} {header} privbench"] = format_cell(at[metric], scale, decimals) if metric in at else "-"
                value = values.get((method, epsilon, metric))
                row[f"ε={format_eps(epsilon)} {header} published"] = "-" if value is None else _as_published(value, decimals)
            rows.append(row)
    return pd.DataFrame(rows)


def _as_published(value: float, decimals: int) -> str:
    """`value` with privbench's decimals for its metric, or with all of its own where it has more."""
    text = f"{value:.{decimals}f}"
    return text if float(text) == value else f"{value:g}"


def _note(dataset: str, ours: pd.DataFrame | None, theirs: pd.DataFrame) -> str:
    cited = "; ".join(sorted(set(theirs["source"])))
    if ours is None:
        return (f"published: {cited}. privbench: no results database to compare "
                "(run `privbench run`, or pass --out or --cells)")
    if ours.empty:
        return f"published: {cited}. privbench: no runs on {dataset} in this database"
    return f"published: {cited}. privbench: preset {', '.join(sorted(ours['preset'].unique()))}; {provenance(ours)}"
