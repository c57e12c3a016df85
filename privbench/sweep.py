"""`privbench sweep`: methods x datasets x epsilons x seeds, run here or submitted as jobs.

The whole grid is resolved and validated (`expand`) before anything runs or is submitted, so a
misspelt name or setting fails at once and leaves nothing behind. Executors:

- `local`: the runs one after another in this process.
- `submitit-local`: `--workers N` processes on this machine (submitit's LocalExecutor), worker i
  taking runs i, i+N, i+2N, ...; on CUDA, worker i gets GPU i mod (the GPUs visible here). The
  workers outlive the command unless it waits for them.
- `slurm`: one SLURM job array, an array job per run (submitit's AutoExecutor); with
  `--slurm-gpus N > 1` each job runs N tasks that train data-parallel, as under torchrun (rank 0
  takes the run's lock and writes; see `run_job`). The output root must be
  on a filesystem the nodes share; privbench.store recognises network filesystems and journals the
  database without WAL there (PRIVBENCH_SQLITE_JOURNAL overrides it).

Every run goes through `harness.run` under `Store.lock(run_id)`: runs already in the database are
skipped, and when two sweeps share a run the second waits for the first and then skips it. A failed
run does not stop the others; the sweep names it at the end. All runs write to one results database
(see privbench.store on how concurrent writers are kept apart).

A sweep that submits jobs keeps its files in `<out>/sweeps/<timestamp>/`: submitit's pickles, one
stdout and one stderr log per job, and `sweep.json` (the command, the executor and its settings,
and each run's job id and logs), so that the jobs can be found again later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tabulate import tabulate

from privbench.config import RunConfig, resolve, sensitive_dataset
from privbench.errors import PrivbenchError
from privbench.store import Store, write_json

log = logging.getLogger("privbench.sweep")

EXECUTORS = ("local", "submitit-local", "slurm")
# LocalExecutor kills a job after `timeout_min` (2 by default); a local worker may take days.
LOCAL_TIMEOUT_MIN = 60 * 24 * 30
POLL_S = 2  # how often a waiting sweep looks for finished jobs


@dataclass(frozen=True)
class SlurmOptions:
    """What each SLURM job asks for (one job per run)."""

    partition: str | None = None  # None: the cluster's default partition
    time_min: int = 120
    gpus: int = 1
    cpus: int = 8
    mem_gb: float = 64
    array_parallelism: int | None = None  # at most this many jobs at once; None: submitit's 256

    def __post_init__(self):
        for flag, value, least in [("--slurm-time", self.time_min, 1), ("--slurm-gpus", self.gpus, 0),
                                   ("--slurm-cpus", self.cpus, 1), ("--slurm-mem", self.mem_gb, 1),
                                   ("--slurm-array-parallelism", self.array_parallelism, 1)]:
            if value is not None and value < least:
                raise PrivbenchError(f"{flag} {value:g} is below {least}: pass e.g. {flag} {max(least, 1)}")

    def parameters(self) -> dict[str, Any]:
        """In AutoExecutor's terms (None means: the cluster's default). A job of several GPUs runs one
        task per GPU, which train data-parallel as torchrun's processes do (see `run_job`); the
        job's CPUs are shared out among them."""
        tasks = max(1, self.gpus)
        return {
            "name": "privbench", "timeout_min": self.time_min, "gpus_per_node": self.gpus, "tasks_per_node": tasks,
            "cpus_per_task": max(1, self.cpus // tasks), "mem_gb": self.mem_gb, "slurm_partition": self.partition,
            "slurm_array_parallelism": self.array_parallelism,
        }


def expand(
    methods: list[str], datasets: list[str], epsilons: list[float], seeds: list[int], preset: str, device: str,
    overrides: dict[str, Any],
) -> list[RunConfig]:
    """The validated configuration of every run of the grid, in the order methods x datasets x
    epsilons x seeds, each run once (two cells that resolve to the same run id are one run)."""
    from privbench.methods import METHODS

    configs: dict[str, RunConfig] = {}
    for method in [METHODS.get(m) for m in methods]:
        for dataset in [sensitive_dataset(d).name for d in datasets]:
            for epsilon in epsilons:
                for seed in seeds:
                    config = resolve(method, dataset, epsilon, seed, preset, device, overrides)
                    configs.setdefault(config.run_id, config)
    if not configs:
        raise PrivbenchError("the sweep has no runs: give at least one --method, --dataset, --eps and --seed")
    return list(configs.values())


def check_executor(executor: str, workers: int) -> None:
    """Refuse an executor this machine cannot use, before anything is written."""
    if executor not in EXECUTORS:
        raise PrivbenchError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if workers < 1:
        raise PrivbenchError(f"--workers {workers} is below 1: pass e.g. --workers 2")
    if executor == "slurm" and (missing := [c for c in ("sbatch", "srun") if shutil.which(c) is None]):
        raise PrivbenchError(
            f"--executor slurm needs SLURM's {' and '.join(missing)} on PATH, which this machine lacks: submit from the "
            "cluster's login node, or run here with --executor local or submitit-local"
        )


def device_for(executor: str, requested: str, slurm_gpus: int) -> str:
    """The device the runs are configured with (it is part of each run's configuration and id)."""
    if executor != "slurm":
        from privbench.runtime import resolve_device

        device = resolve_device(requested)
        if executor == "submitit-local" and device.index is not None:
            raise PrivbenchError(f"--device {requested} with --executor submitit-local: each worker gets a GPU of "
                                 "its own; pass --device cuda (or auto)")
        return str(device)
    # The nodes' devices cannot be seen from here: what the jobs ask SLURM for decides.
    device = ("cuda" if slurm_gpus else "cpu") if requested == "auto" else requested
    if device not in ("cpu", "cuda"):
        raise PrivbenchError(f"--device {requested} with --executor slurm: use auto, cpu or cuda (a job sees only its own GPUs)")
    if device == "cuda" and not slurm_gpus:
        raise PrivbenchError("--device cuda with --slurm-gpus 0: ask for a GPU per job with --slurm-gpus 1")
    return device


def plan(configs: list[RunConfig], out: str | Path) -> str:
    """The runs of a sweep as a table, marking those the database already has (and creating nothing)."""
    database = Path(out) / "results.sqlite"
    finished = set(Store(out).runs()["run_id"]) if database.exists() else set()
    rows = [(c.run_id, c.method, c.dataset, f"{c.epsilon:g}", c.seed, c.device,
             "finished" if c.run_id in finished else "to run") for c in configs]
    todo = sum(row[-1] == "to run" for row in rows)
    table = tabulate(rows, headers=["run", "method", "dataset", "eps", "seed", "device", "status"], tablefmt="github")
    return f"{table}\n\n{len(configs)} runs, {todo} to run; nothing submitted (--dry-run)"


def run_each(configs: list[RunConfig], store: Store, progress: bool, audit: bool, lock: bool = True
             ) -> dict[str, Path | None]:
    """Do each run in this process, one after another, going on past failures; the failed runs,
    each with its log (None when it failed before its run directory had one). With `lock`, each run
    is done under the database's per-run lock (only one of a job's data-parallel tasks may take it:
    the others would wait for it while the holder waits for them)."""
    from privbench.harness import run

    failed: dict[str, Path | None] = {}
    for config in configs:
        try:
            with store.lock(config.run_id) if lock else contextlib.nullcontext():
                run(config, store, progress=progress, audit=audit)
        except Exception as e:  # a failed run must not cost the others theirs
            log.error("run %s failed: %s", config.run_id, e, exc_info=not isinstance(e, PrivbenchError))
            run_log = store.run_dir(config.run_id) / "log.txt"
            failed[config.run_id] = run_log if run_log.exists() else None
    return failed


def run_job(configs: list[RunConfig], root: str, audit: bool) -> list[str]:
    """What a submitted job does, in a process of its own: its runs, one after another. Raises (so
    that the scheduler and submitit mark the job failed) when one of them failed."""
    from privbench.runtime import console_logging

    console_logging(verbose=False, quiet=False)  # the job's log narrates its runs as `privbench run` does
    rank = _join_job_tasks()
    failed = run_each(configs, Store(root), progress=False, audit=audit, lock=rank == 0)
    if failed:
        raise PrivbenchError(f"runs failed: {', '.join(failed)} (their errors are above)")
    return [config.run_id for config in configs]


def _join_job_tasks() -> int:
    """In a SLURM job of several tasks (--slurm-gpus > 1), set the variables torch.distributed reads
    (RANK, WORLD_SIZE, MASTER_ADDR, ...), as torchrun would, so that the tasks' runs train
    data-parallel (privbench.dp.distributed). Every GPU stays visible to every task, which takes the
    one of its LOCAL_RANK. Returns this task's rank (0 in a job of one task)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return 0
    import submitit

    task = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    log.info("task %d of %d, rendezvous at %s:%d", task.rank, task.world_size, task.master_addr, task.master_port)
    return task.rank


@dataclass
class Submission:
    """Jobs submitted for a sweep: where their files are and which job does which run."""

    folder: Path
    jobs: dict[str, Any]  # run id -> submitit Job (a submitit-local worker does several runs)

    def table(self) -> str:
        rows = [(run_id, job.job_id, job.state, job.paths.stderr) for run_id, job in self.jobs.items()]
        return tabulate(rows, headers=["run", "job", "state", "log"], tablefmt="github")

    def wait(self, store: Store) -> dict[str, Path]:
        """Wait for every job, saying as each ends which of its runs finished; the failed runs, with
        the logs of their jobs. The database decides: a run it does not hold failed, whatever the job says."""
        import submitit

        unique = list({job.job_id: job for job in self.jobs.values()}.values())
        failed: dict[str, Path] = {}
        for job in submitit.helpers.as_completed(unique, poll_frequency=POLL_S):
            for run_id in [r for r, j in self.jobs.items() if j is job]:
                ok = store.has(run_id)
                log.info("job %s ended: %s %s", job.job_id, run_id, "finished" if ok else f"FAILED (log {job.paths.stderr})")
                if not ok:
                    failed[run_id] = job.paths.stderr
        return failed


def submit(
    configs: list[RunConfig], store: Store, executor: str, audit: bool, workers: int, slurm: SlurmOptions, command: str,
) -> Submission:
    """Submit the runs as jobs (`executor` submitit-local or slurm) and write the sweep's manifest."""
    import submitit

    folder = store.root / "sweeps" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    root = str(store.root.resolve())
    if executor == "slurm":
        slurm_executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        slurm_executor.update_parameters(**slurm.parameters())
        jobs = slurm_executor.map_array(run_job, [[c] for c in configs], [root] * len(configs), [audit] * len(configs))
        by_run = {config.run_id: job for config, job in zip(configs, jobs)}
        settings = dataclasses.asdict(slurm)
    else:
        by_run = _submit_local(configs, folder, root, audit, workers, configs[0].device.startswith("cuda"))
        settings = {"workers": workers}
    submission = Submission(folder, by_run)
    write_json(folder / "sweep.json", {
        "command": command, "executor": executor, "settings": settings, "out": root,
        "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": [{"run_id": run_id, "job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
                 for run_id, job in by_run.items()],
    })
    return submission


def _submit_local(configs: list[RunConfig], folder: Path, root: str, audit: bool, workers: int, cuda: bool) -> dict[str, Any]:
    """One LocalExecutor job per worker, each doing every `workers`-th run, each on a GPU of its own on CUDA."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    gpus = _visible_gpus() if cuda else []
    by_run = {}
    for worker in range(min(workers, len(configs))):
        share = configs[worker::workers]
        if gpus:
            # LocalExecutor sets CUDA_VISIBLE_DEVICES itself, to physical indices.
            executor.update_parameters(gpus_per_node=1, visible_gpus=(gpus[worker % len(gpus)],))
        job = executor.submit(run_job, share, root, audit)
        by_run |= {config.run_id: job for config in share}
    return {config.run_id: by_run[config.run_id] for config in configs}


def _visible_gpus() -> list[int]:
    """The physical indices of the GPUs this process may use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        return list(range(torch.cuda.device_count()))
    try:
        return [int(v) for v in visible.split(",") if v.strip()]
    except ValueError:
        raise PrivbenchError(f"CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID: submitit-local needs their indices, "
                             "e.g. CUDA_VISIBLE_DEVICES=0,1") from None


def failure_message(failed: dict[str, Path | None], total: int) -> str:
    """One line naming every failed run and where its log is."""
    named = ", ".join(f"{run_id} (log {where})" if where else f"{run_id} (see the error above)" for run_id, where in failed.items())
    return f"{len(failed)} of {total} runs failed: {named}; run the same command again to retry them"
