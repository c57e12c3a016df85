"""Metric regression: a results database against a committed leaderboard's per-run cells.

A committed leaderboard's CSV (`privbench table --format csv`) holds every headline number of every
run at full precision with the run's config hash. `compare` matches runs by (dataset, method, preset,
seed, target epsilon) and reports each number that moved beyond its tolerance, the composed epsilon
above all: a changed epsilon means the privacy accounting changed, which must never pass silently.
A run is deterministic on one machine (seeded split, noise, training and sampling), but not across
CPUs, BLAS libraries and torch versions: their floating-point differences grow through training.
So a board carries the tolerances measured for it, in `<board>-tolerances.yaml` beside its CSV
(each with how it was measured); the defaults below only absorb rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from privbench.errors import PrivbenchError
from privbench.metrics.names import EPS_LB, TPR
from privbench.report.tables import CELL_KEYS, CELL_SCORES, CELL_VALUES

# Absolute tolerances (CA, precision, recall and TPR are fractions); epsilon's is relative.
TOLERANCES = {
    "epsilon": 1e-6, "fid": 1.0, "precision": 0.02, "recall": 0.02, "ca": 0.01, "ca_std": 0.01,
    "ca_noisy": 0.01, "ca_oracle": 0.01, TPR: 0.03, EPS_LB: 0.05,
}  # fmt: skip


def load_cells(path: str | Path) -> pd.DataFrame:
    """A committed leaderboard CSV, checked for the columns a comparison needs."""
    path = Path(path)
    if not path.is_file():
        raise PrivbenchError(f"no leaderboard CSV at {path}: pass e.g. --against leaderboards/smoke/mnist.csv")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PrivbenchError(f"{path} is not a readable CSV ({str(e).strip()}): regenerate it with privbench table --format csv") from e
    # Scores added or dropped since the file was written are compared where both sides hold them; the
    # cell's identity and its epsilon never go uncompared.
    if missing := [c for c in (*CELL_KEYS, "config_hash", "epsilon") if c not in table]:
        raise PrivbenchError(f"{path} lacks the column(s) {', '.join(missing)}: regenerate it with privbench table --format csv")
    return table


def tolerances_path(cells: str | Path) -> Path:
    cells = Path(cells)
    return cells.with_name(f"{cells.stem}-tolerances.yaml")


def board_tolerances(cells: str | Path) -> dict[str, float]:
    """The defaults, overridden by the board's own tolerances file where it has one."""
    tolerances = dict(TOLERANCES)
    path = tolerances_path(cells)
    if not path.is_file():
        return tolerances
    try:
        measured = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PrivbenchError(f"{path} is not valid YAML ({e}): fix it or remove it to use the default tolerances") from None
    if not isinstance(measured, dict) or (unknown := set(measured) - set(TOLERANCES) - set(CELL_SCORES)):
        raise PrivbenchError(f"{path} must map metric names ({', '.join([*TOLERANCES, *CELL_SCORES])}) to tolerances"
                             + (f"; unknown: {', '.join(sorted(map(str, unknown)))}" if isinstance(measured, dict) else ""))
    for name, value in measured.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise PrivbenchError(f"{path}: the tolerance of {name} must be a number >= 0, got {value!r}")
        tolerances[name] = float(value)
    return tolerances


def parse_tolerances(text: str | None, base: dict[str, float] | None = None) -> dict[str, float]:
    """`base` (the default tolerances if None), with "fid=0.5,ca=0.005" overriding some."""
    tolerances = dict(TOLERANCES if base is None else base)
    for item in [t for t in (text or "").split(",") if t.strip()]:
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in tolerances:
            raise PrivbenchError(f"--tolerance: unknown metric {name!r}; choose from {', '.join(tolerances)}")
        try:
            tolerances[name] = float(value)
        except ValueError:
            raise PrivbenchError(f"--tolerance {item!r} is not metric=number: write e.g. --tolerance fid=0.5") from None
        if tolerances[name] < 0:
            raise PrivbenchError(f"--tolerance {item!r} is negative: a tolerance is a distance, e.g. fid=0.5")
    return tolerances


def _within(expected: float, actual: float, name: str, tolerance: float) -> bool:
    if math.isnan(expected) or math.isnan(actual):
        return math.isnan(expected) and math.isnan(actual)
    if math.isinf(expected) or math.isinf(actual):
        return expected == actual
    scale = max(1.0, abs(expected)) if name == "epsilon" else 1.0
    return abs(actual - expected) <= tolerance * scale


def cell_name(row: pd.Series) -> str:
    eps = "inf" if math.isinf(row["target_epsilon"]) else f"{row['target_epsilon']:g}"
    return f"{row['method']} {row['dataset']} eps={eps} seed={row['seed']} ({row['preset']})"


def compared_metrics(expected: pd.DataFrame, actual: pd.DataFrame, tolerances: dict[str, float]) -> tuple[list[str], list[str]]:
    """(compared, not compared): a number is compared where both sides have its column and it has a
    tolerance (the defaults, or the board's measured ones for the scores added later)."""
    names = [*CELL_VALUES, *CELL_SCORES]
    compared = [n for n in names if n in expected and n in actual and n in tolerances]
    return compared, [n for n in names if n not in compared]


def compare(expected: pd.DataFrame, actual: pd.DataFrame, tolerances: dict[str, float]) -> pd.DataFrame:
    """One row per (cell, number compared): expected, actual, difference, tolerance and whether it passed.

    A cell missing from `actual`, or run with another configuration (config hash), fails as a whole.
    """
    compared, _ = compared_metrics(expected, actual, tolerances)
    rows = []
    merged = expected.merge(actual, on=list(CELL_KEYS), how="left", suffixes=("", "_actual"), indicator=True)
    for _, row in merged.iterrows():
        cell = cell_name(row)
        if row["_merge"] == "left_only":
            rows.append({"cell": cell, "metric": "run", "ok": False, "note": "not in the database: run it (or pass --rerun)"})
            continue
        if row["config_hash"] != row["config_hash_actual"]:
            rows.append({"cell": cell, "metric": "config_hash", "expected": row["config_hash"], "actual": row["config_hash_actual"],
                         "ok": False, "note": "the configuration changed: regenerate the leaderboard"})
            continue
        for name in compared:
            want, got = float(row[name]), float(row[f"{name}_actual"])
            ok = _within(want, got, name, tolerances[name])
            rows.append({"cell": cell, "metric": name, "expected": want, "actual": got, "difference": got - want,
                         "tolerance": tolerances[name], "ok": ok,
                         "note": "" if ok else ("THE COMPOSED EPSILON CHANGED" if name == "epsilon" else "moved beyond tolerance")})
    return pd.DataFrame(rows, columns=["cell", "metric", "expected", "actual", "difference", "tolerance", "ok", "note"])
