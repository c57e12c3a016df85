"""Where a leaderboard's runs come from: results databases, committed per-run cells, or both.

A board that takes longer than one sitting accumulates. Each session, machine or cluster job records
its runs in a results database of its own, and commits them as per-run cells: `privbench table
--format csv --output board.csv` writes `board.csv` (one row per run, every headline number at full
precision), `board-costs.csv` beside it (every stage's cost of every run) and `grids/<run_id>.png`
(each run's sample grid). `gather` merges any number of databases and cell files into one set of
runs and costs; a run id names one configuration, so a run found in several sources is taken from
the first that has it (databases first, then cell files, each in the order given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privbench.errors import PrivbenchError
from privbench.report.regression import load_cells
from privbench.store import Store, write_atomic

GRIDS = "grids"  # beside a cells CSV: <run_id>.png, each run's sample grid
COST_COLUMNS = ("run_id", "stage", "wall_s", "device_s", "peak_host_bytes", "peak_device_bytes", "params", "device_name",
                "reused")


@dataclass(frozen=True)
class Board:
    """Finished runs (one row each, metrics as columns, `samples_png` the path of its grid) and their costs."""

    runs: pd.DataFrame
    costs: pd.DataFrame

    def only(self, presets: list[str] | None = None, datasets: list[str] | None = None,
             methods: list[str] | None = None) -> "Board":
        runs = self.runs
        for column, wanted in (("preset", presets), ("dataset", datasets), ("method", methods)):
            if wanted:
                if not runs[column].isin(wanted).any():
                    have = ", ".join(sorted(self.runs[column].unique())) or "none"
                    raise PrivbenchError(f"no finished runs of {column} {', '.join(wanted)}: the sources hold {have}")
                runs = runs[runs[column].isin(wanted)]
        return Board(runs, self.costs[self.costs["run_id"].isin(runs["run_id"])])


def costs_path(cells: str | Path) -> Path:
    cells = Path(cells)
    return cells.with_name(f"{cells.stem}-costs.csv")


def run_id_of(row: pd.Series) -> str:
    """A cell's run id, as `RunConfig.run_id` spells it (cell files written before they carried it)."""
    eps = "inf" if math.isinf(row["target_epsilon"]) else f"{row['target_epsilon']:g}"
    return f"{row['method']}_{row['dataset']}_eps{eps}_seed{row['seed']}_{row['preset']}_{row['config_hash']}"


def from_store(root: str | Path) -> Board:
    if not (Path(root) / "results.sqlite").exists():
        raise PrivbenchError(f"no results database in {root}: run `privbench run` first or pass another --out")
    store = Store(root)
    runs = store.runs()
    # From the store's own root: the stored run_dir is relative to wherever `privbench run` started.
    runs["samples_png"] = [str(store.run_dir(r) / "samples.png") for r in runs["run_id"]]
    return Board(runs, store.costs())


def from_cells(path: str | Path) -> Board:
    """A committed cells CSV with its costs file and grids (either may be absent: older boards)."""
    path = Path(path)
    runs = load_cells(path)
    if "run_id" not in runs:
        runs["run_id"] = [run_id_of(row) for _, row in runs.iterrows()]
    runs["run_id"] = runs["run_id"].astype(str)
    runs["samples_png"] = [str(path.parent / GRIDS / f"{r}.png") for r in runs["run_id"]]
    costs = pd.DataFrame(columns=list(COST_COLUMNS))
    if costs_path(path).is_file():
        try:
            costs = pd.read_csv(costs_path(path))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise PrivbenchError(f"{costs_path(path)} is not a readable CSV ({str(e).strip()}): regenerate it with "
                                 "privbench table --format csv --output") from e
        if missing := [c for c in COST_COLUMNS if c not in costs]:
            raise PrivbenchError(f"{costs_path(path)} lacks the column(s) {', '.join(missing)}: regenerate it with "
                                 "privbench table --format csv --output")
        costs["run_id"] = costs["run_id"].astype(str)
    return Board(runs, costs)


def gather(outs: list[str | Path], cells: list[str | Path]) -> Board:
    """Every run of the given databases and cell files, each run once (the first source that has it)."""
    boards = [from_store(o) for o in outs] + [from_cells(c) for c in cells]
    if not boards:
        raise PrivbenchError("no source of runs: pass --out DIR (a results database) and/or --cells FILE.csv")
    runs, costs, seen = [], [], set()
    for board in boards:
        fresh = board.runs[~board.runs["run_id"].isin(seen)].drop_duplicates("run_id")
        seen |= set(fresh["run_id"])
        runs.append(fresh)
        costs.append(board.costs[board.costs["run_id"].isin(fresh["run_id"])])
    merged = pd.concat([r for r in runs if not r.empty] or runs[:1], ignore_index=True)
    if merged.empty:
        raise PrivbenchError("the sources hold no finished runs: run `privbench run` first")
    return Board(merged, pd.concat([c for c in costs if not c.empty] or costs[:1], ignore_index=True))


def write_cells(board: Board, path: str | Path, cells_csv: str) -> list[Path]:
    """`path` (the cells, `cells_csv`), its costs file, and a copy of every run's sample grid under grids/."""
    path = Path(path)
    written = [write_atomic(path, cells_csv)]
    costs = board.costs.reindex(columns=list(COST_COLUMNS)).sort_values(["run_id", "stage"])
    written.append(write_atomic(costs_path(path), costs.to_csv(index=False)))
    for run_id, grid in zip(board.runs["run_id"], board.runs["samples_png"]):
        target = path.parent / GRIDS / f"{run_id}.png"
        if Path(grid).is_file() and Path(grid).resolve() != target.resolve():
            written.append(write_atomic(target, Path(grid).read_bytes()))
    return written
