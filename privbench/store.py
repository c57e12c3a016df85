"""Run directories and the SQLite results database.

Layout under the output root (`--out`, default ./privbench-runs):
  results.sqlite          runs, metrics and costs of finished runs
  runs/<run_id>/          config.yaml, split.json, ledger.json, log.txt, fit.pt, samples.npz,
                          samples.png, metrics.json, costs.json
  cache/                  derived data shared across runs (FID reference statistics, ...)

Crash safety: every file is written to a temporary name and renamed into place, so a file that
exists is complete; a finished run enters the database in one transaction (its run row, metrics and
costs together), so a killed run leaves either nothing or everything there.

Concurrency (the runs of a sweep share one output root, in several processes or on several hosts):
- Every write is one `BEGIN IMMEDIATE` transaction: it takes the database's write lock before it
  reads or writes anything, and a writer that finds the lock taken waits up to BUSY_TIMEOUT_S.
  Reads that take several queries (`runs`) read one snapshot.
- The journal is WAL (readers never block the writer) on a local filesystem, and DELETE on a
  network filesystem, where WAL cannot work across hosts (see `journal_mode`);
  PRIVBENCH_SQLITE_JOURNAL=wal|delete|truncate|persist overrides the choice.
- `Store.lock(run_id)` lets one process at a time work on a run: a second process that starts the
  same run waits until the first lets go, then finds the run finished and skips it (or, if the
  first failed, resumes it). The lock file `runs/<run_id>/.lock` stays behind, harmless: the lock
  itself lasts only as long as the process that holds it.
"""

from __future__ import annotations

import fcntl
import functools
import io
import json
import logging
import math
import os
import socket
import sqlite3
import subprocess
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from privbench.errors import PrivbenchError

log = logging.getLogger("privbench.store")

BUSY_TIMEOUT_S = 60  # a write transaction lasts milliseconds; this covers many runs finishing at once
JOURNAL_ENV = "PRIVBENCH_SQLITE_JOURNAL"
JOURNAL_MODES = ("wal", "delete", "truncate", "persist")
# Filesystems that several hosts mount at once (/proc/self/mountinfo's type field).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "fuse.beegfs", "ceph", "fuse.ceph",
    "glusterfs", "fuse.glusterfs", "panfs", "afs", "fuse.sshfs", "9p", "virtiofs", "wekafs",
})

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, method TEXT NOT NULL, dataset TEXT NOT NULL, preset TEXT NOT NULL,
    seed INTEGER NOT NULL, target_epsilon REAL NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL,
    accountant TEXT NOT NULL, config_hash TEXT NOT NULL, config TEXT NOT NULL, commit_id TEXT,
    device TEXT, finished TEXT NOT NULL, run_dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id), name TEXT NOT NULL, value REAL, detail TEXT,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS costs (
    run_id TEXT NOT NULL REFERENCES runs(run_id), stage TEXT NOT NULL, wall_s REAL, device_s REAL,
    peak_host_bytes INTEGER, peak_device_bytes INTEGER, params INTEGER, device_name TEXT,
    reused INTEGER NOT NULL, PRIMARY KEY (run_id, stage)
);
"""


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file and a rename: readers see all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_plain) + "\n")


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_atomic(path, buffer.getvalue())


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


@functools.lru_cache(maxsize=1)
def commit_id() -> str | None:
    """The git commit of the privbench checkout, when it is one (provenance for tables), with
    "+dirty" when tracked files differ from it: such results cannot be reproduced from the commit.
    Read once per process: a commit made while a long sweep runs must not be credited with its results."""
    return git_commit(Path(__file__).parent)


def git_commit(here: Path) -> str | None:
    """HEAD of the git checkout holding `here` (12 hex digits), "+dirty" if tracked files changed."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                                 text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("+dirty" if changed.returncode == 0 and changed.stdout.strip() else "")


def journal_mode(root: Path) -> str:
    """The SQLite journal mode for a database under `root`: $PRIVBENCH_SQLITE_JOURNAL, else WAL on a
    local filesystem and DELETE on a network one.

    WAL keeps its index in shared memory (the -shm file, mapped by every connection), which processes
    on different hosts do not share: SLURM jobs on several nodes writing to one WAL database on NFS or
    Lustre can corrupt it. DELETE (a rollback journal) needs only file locks, which such filesystems
    pass between hosts (NFS through its lock manager), at the price of readers blocking writers for
    the length of a read.
    """
    chosen = os.environ.get(JOURNAL_ENV, "").strip().lower()
    if chosen:
        if chosen not in JOURNAL_MODES:
            raise PrivbenchError(f"{JOURNAL_ENV}={chosen!r} is not a journal mode: use one of {', '.join(JOURNAL_MODES)}")
        return chosen
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:  # not Linux: assume a local disk
        return "wal"
    return "delete" if filesystem_type(os.path.realpath(root), mountinfo) in NETWORK_FILESYSTEMS else "wal"


def filesystem_type(path: str | Path, mountinfo: str) -> str | None:
    """The type of the filesystem holding the absolute, resolved `path`, from the text of
    /proc/self/mountinfo: that of the deepest mount point above it (spaces in mount points are
    written there as \\040)."""
    path = Path(path)
    best, kind = None, None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        if (mount_point == path or mount_point in path.parents) and (best is None or len(mount_point.parts) >= len(best.parts)):
            best, kind = mount_point, fields[fields.index("-", 6) + 1]
    return kind


class Store:
    """The results database and run directories under one output root."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.db_path = self.root / "results.sqlite"
        self.root.mkdir(parents=True, exist_ok=True)
        self.journal = journal_mode(self.root)
        with closing(self._connect()) as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        """A connection in autocommit mode: transactions are opened explicitly (`_writing`, `_reading`)."""
        try:
            db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute(f"PRAGMA journal_mode={self.journal}")
            db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise PrivbenchError(
                f"{self.db_path} is not a readable results database ({e}): point --out elsewhere or restore the file"
            ) from e
        return db

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its start (so that no other writer can
        slip in between what it reads and what it writes); rolled back if anything fails."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: its queries see the same state of the database."""
        with closing(self._connect()) as db:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    @contextmanager
    def lock(self, run_id: str) -> Iterator[None]:
        """Work on run `run_id` alone: wait while another process (here or on another host) holds it.

        flock on `runs/<run_id>/.lock`; Linux NFS clients carry flock to the server as a POSIX lock,
        so it holds across the nodes of a cluster too. The lock goes with the process that holds it,
        however that process ends.
        """
        path = self.run_dir(run_id) / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        with open(path, "r+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for run %s: %s holds %s", run_id, f.read().strip() or "another process", path)
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            yield

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def has(self, run_id: str) -> bool:
        with closing(self._connect()) as db:
            return db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None

    def record(self, run: dict[str, Any], metrics: dict[str, tuple[float | None, Any]], costs: list[dict[str, Any]]) -> None:
        """Insert a finished run with its metrics and costs (`CostRecorder.records()`), in one transaction."""
        with self._writing() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (:run_id, :method, :dataset, :preset, :seed, :target_epsilon, "
                ":epsilon, :delta, :accountant, :config_hash, :config, :commit_id, :device, :finished, :run_dir)",
                run,
            )
            db.execute("DELETE FROM metrics WHERE run_id = ?", (run["run_id"],))
            db.execute("DELETE FROM costs WHERE run_id = ?", (run["run_id"],))
            _insert(db, run["run_id"], metrics, costs)

    def replace(self, run_id: str, metrics: dict[str, tuple[float | None, Any]], cost: dict[str, Any],
                stale: Callable[[str], bool]) -> None:
        """Swap a finished run's metrics that are `stale` (by name) and the cost of the stage `cost` names
        for `metrics` and `cost`, in one transaction."""
        with self._writing() as db:
            stored = [name for (name,) in db.execute("SELECT name FROM metrics WHERE run_id = ?", (run_id,))]
            db.executemany("DELETE FROM metrics WHERE run_id = ? AND name = ?",
                           [(run_id, name) for name in stored if stale(name) or name in metrics])
            db.execute("DELETE FROM costs WHERE run_id = ? AND stage = ?", (run_id, cost["name"]))
            _insert(db, run_id, metrics, [cost])

    def runs(self) -> pd.DataFrame:
        """One row per finished run, one column per metric."""
        with self._reading() as db:
            runs = pd.read_sql_query("SELECT * FROM runs", db)
            metrics = pd.read_sql_query("SELECT run_id, name, value FROM metrics", db)
        if metrics.empty:
            return runs
        wide = metrics.pivot(index="run_id", columns="name", values="value").reset_index()
        return runs.merge(wide, on="run_id", how="left")

    def costs(self) -> pd.DataFrame:
        with closing(self._connect()) as db:
            return pd.read_sql_query("SELECT * FROM costs", db)


def _insert(db: sqlite3.Connection, run_id: str, metrics: dict[str, tuple[float | None, Any]], costs: list[dict[str, Any]]) -> None:
    db.executemany(
        "INSERT INTO metrics VALUES (?, ?, ?, ?)",
        [(run_id, name, _real(value), json.dumps(detail, default=_plain)) for name, (value, detail) in metrics.items()],
    )
    db.executemany(
        "INSERT INTO costs VALUES (:run_id, :name, :wall_s, :device_s, :peak_host_bytes, "
        ":peak_device_bytes, :params, :device_name, :reused)",
        [{**cost, "run_id": run_id} for cost in costs],
    )


def _real(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
