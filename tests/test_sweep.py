"""`privbench sweep`: expanding the grid, refusing bad input up front, many processes writing one
results database, the per-run lock, submission to SLURM (through stand-in commands) and one real
sweep of two runs in two local worker processes."""

import json
import logging
import math
import multiprocessing
import sqlite3
import threading
import time
from itertools import product

import pytest

from privbench import cli, sweep
from privbench.config import parse_overrides
from privbench.errors import PrivbenchError
from privbench.store import Store, filesystem_type

# DP-MERF small enough for seconds per stage on a 2-core CPU; FID's 2048x2048 matrix square root
# (tens of seconds) is what remains.
CHEAP = [
    "params.d_rff=200", "params.epochs=1", "eval.samples=60", "eval.fid_samples=8", "eval.fid_reference=8",
    "eval.ca_epochs=1", "eval.ca_classifiers=[cnn]",
]
CHEAP_FLAGS = [a for item in CHEAP for a in ("--set", item)]


def cheap_grid(epsilons=(1.0, 10.0), seeds=(0,)):
    return sweep.expand(["dp-merf"], ["mnist"], list(epsilons), list(seeds), "smoke", "cpu", parse_overrides(CHEAP))


def record(store, run_id, value=1.0):
    """A synthetic finished run: every metric is `value`, so a reader can tell whose write it sees."""
    row = {
        "run_id": run_id, "method": "dp-merf", "dataset": "mnist", "preset": "smoke", "seed": 0, "target_epsilon": 1.0,
        "epsilon": 0.99, "delta": 1e-5, "accountant": "prv", "config_hash": "h", "config": "{}", "commit_id": "c",
        "device": "cpu", "finished": "2026-01-01T00:00:00+00:00", "run_dir": str(store.run_dir(run_id)),
    }
    costs = [{"name": stage, "wall_s": value, "device_s": value, "peak_host_bytes": 1, "peak_device_bytes": None,
              "params": 1, "device_name": "cpu", "reused": False} for stage in ("fit", "fid")]
    store.record(row, {name: (value, {"writer": value}) for name in ("fid", "ca", "precision")}, costs)


def test_expand_is_the_product_of_methods_datasets_epsilons_and_seeds_in_order():
    configs = sweep.expand(["dp-merf", "dpdm"], ["mnist"], [1.0, 10.0], [0, 1, 2], "smoke", "cpu", {})
    assert [(c.method, c.dataset, c.epsilon, c.seed) for c in configs] == list(
        product(["dp-merf", "dpdm"], ["mnist"], [1.0, 10.0], [0, 1, 2]))
    assert len({c.run_id for c in configs}) == 12
    assert all(c.preset == "smoke" and c.device == "cpu" for c in configs)


def test_expand_runs_each_run_once():
    configs = sweep.expand(["dp-merf", "DP-MERF"], ["mnist", "MNIST"], [1.0, 1, 10.0], [0, 0], "smoke", "cpu", {})
    assert [(c.method, c.dataset, c.epsilon) for c in configs] == [("dp-merf", "mnist", 1.0), ("dp-merf", "mnist", 10.0)]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "dp-merf,dp-merff"], "unknown method 'dp-merff' (did you mean 'dp-merf'?)"),
        (["--method", "dp-merf", "--dataset", "mnist,cifar1000"], "unknown dataset 'cifar1000'"),
        (["--method", "dp-merf", "--dataset", "mnist,glyphs"], "glyphs is a public dataset"),
        (["--method", "dp-merf", "--eps", "1,0"], "epsilon must be > 0"),
        (["--method", "dp-merf", "--set", "eval.sample=3"], "did you mean 'eval.samples'"),
        (["--method", "dp-merf", "--preset", "huge"], "unknown preset 'huge'"),
        (["--method", "dp-merf", "--executor", "slurm"], "--executor slurm needs SLURM's sbatch and srun on PATH"),
        (["--method", "dp-merf", "--executor", "cluster"], "unknown executor 'cluster'"),
        (["--method", "dp-merf", "--executor", "submitit-local", "--workers", "0"], "--workers 0 is below 1"),
        (["--method", "dp-merf", "--slurm-time", "0"], "--slurm-time 0 is below 1"),
    ],
)
def test_bad_input_fails_in_one_line_before_anything_is_written(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here, whatever the machine has
    eps = [] if "--eps" in flags else ["--eps", "1,10"]
    assert cli.main(["sweep", *flags, *eps, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_runs_marks_finished_ones_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sweep", "--method", "dp-merf", "--eps", "1,10", "--seed", "0,1", "--dry-run", "--out", str(out), *CHEAP_FLAGS]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    configs = cheap_grid(seeds=(0, 1))
    assert all(c.run_id in printed for c in configs)
    assert "4 runs, 4 to run; nothing submitted (--dry-run)" in printed
    assert not out.exists()

    record(Store(out), configs[0].run_id)
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 3 to run" in printed
    assert [line for line in printed.splitlines() if configs[0].run_id in line][0].rstrip(" |").endswith("finished")
    assert not (out / "runs" / configs[1].run_id).exists() and not (out / "sweeps").exists()


def _write_runs(root, writer, count, start):
    start.wait()
    store = Store(root)
    for i in range(count):
        record(store, f"writer{writer}-run{i}", float(writer))
        record(store, "shared", float(writer))  # every writer replaces this one, over and over


def _read_runs(root, start, stop):
    """Fails (exit status 1) if it ever sees a run without all of its metrics, or mixed writers' metrics."""
    start.wait()
    store = Store(root)
    while not stop.is_set():
        runs = store.runs()
        if not runs.empty:
            metrics = runs.set_index("run_id")[["fid", "ca", "precision"]]
            assert metrics.notna().all().all()
            assert metrics.nunique(axis=1).eq(1).all()


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_many_processes_record_into_one_database_and_nothing_is_lost(journal, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVBENCH_SQLITE_JOURNAL", journal)  # delete: what a network filesystem gets
    store = Store(tmp_path)
    with sqlite3.connect(store.db_path) as db:  # WAL is a lasting property of the file; DELETE is the default
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == journal
    writers, count = 3, 40
    context = multiprocessing.get_context("fork")  # separate processes, each with its own connections
    start, stop = context.Barrier(writers + 1), context.Event()
    reader = context.Process(target=_read_runs, args=(str(tmp_path), start, stop))
    processes = [context.Process(target=_write_runs, args=(str(tmp_path), w, count, start)) for w in range(writers)]
    for process in [reader, *processes]:
        process.start()
    for process in processes:
        process.join(timeout=120)
    stop.set()
    reader.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * writers
    assert reader.exitcode == 0, "a reader saw a run without its metrics, or metrics of two writers"

    runs = store.runs()
    assert len(runs) == writers * count + 1 and runs["run_id"].is_unique
    expected = {f"writer{w}-run{i}" for w in range(writers) for i in range(count)} | {"shared"}
    assert set(runs["run_id"]) == expected
    for _, row in runs.iterrows():
        assert row["fid"] == row["ca"] == row["precision"]
    costs = store.costs()
    assert len(costs) == 2 * len(expected) and not costs.duplicated(["run_id", "stage"]).any()


def test_journal_mode_follows_the_environment_and_refuses_unknown_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVBENCH_SQLITE_JOURNAL", "truncate")
    store = Store(tmp_path)
    record(store, "run")
    journal = tmp_path / "results.sqlite-journal"
    assert journal.exists() and journal.stat().st_size == 0  # truncated after the commit, not deleted
    assert not (tmp_path / "results.sqlite-wal").exists()
    monkeypatch.setenv("PRIVBENCH_SQLITE_JOURNAL", "wall")
    with pytest.raises(PrivbenchError, match="PRIVBENCH_SQLITE_JOURNAL='wall' is not a journal mode"):
        Store(tmp_path)


def test_filesystem_type_is_that_of_the_deepest_mount_above_the_path():
    mountinfo = "\n".join([
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw",
        "23 22 0:40 / /mnt/shared rw,relatime shared:5 - nfs4 server:/export rw,vers=4.2",
        "24 23 0:41 / /mnt/shared/scratch\\040space rw - lustre 10.0.0.1@tcp:/fs rw",
    ])
    assert filesystem_type("/mnt/shared/runs/x", mountinfo) == "nfs4"
    assert filesystem_type("/mnt/shared", mountinfo) == "nfs4"
    assert filesystem_type("/mnt/shared/scratch space/runs", mountinfo) == "lustre"
    assert filesystem_type("/mnt/sharedother", mountinfo) == "ext4"
    assert filesystem_type("/home/me", mountinfo) == "ext4"


def test_a_second_process_on_a_run_waits_for_the_first_then_skips_it(tmp_path, caplog):
    store = Store(tmp_path)
    (config,) = cheap_grid(epsilons=(1.0,))
    held, hold_s = threading.Event(), 1.5

    def first():  # stands for another process that does the run and records it
        with store.lock(config.run_id):
            held.set()
            time.sleep(hold_s)
            record(store, config.run_id)

    other = threading.Thread(target=first)
    other.start()
    held.wait()
    started = time.monotonic()
    logger = logging.getLogger("privbench")  # the CLI stops it propagating to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="privbench"):
            failed = sweep.run_each([config], store, progress=False, audit=False)
    finally:
        logger.removeHandler(caplog.handler)
    waited = time.monotonic() - started
    other.join()
    assert failed == {}
    assert waited >= hold_s - 0.2
    assert f"waiting for run {config.run_id}" in caplog.text and "finished already: skipped" in caplog.text
    assert [p.name for p in store.run_dir(config.run_id).iterdir()] == [".lock"]  # nothing was computed twice


def test_a_local_sweep_goes_on_past_a_failed_run_and_names_every_failure(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sweep", "--method", "dp-merf", "--dataset", "cifar10", "--eps", "1,10", "--quiet", "--no-audit",
                     "--set", f"data.path={tmp_path / 'missing'}", "--out", str(out), *CHEAP_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert sum("not found at" in line for line in err) == 2  # each run tried, each error said
    ids = [c.run_id for c in sweep.expand(["dp-merf"], ["cifar10"], [1.0, 10.0], [0], "smoke", "cpu",
                                          parse_overrides([*CHEAP, f"data.path={tmp_path / 'missing'}"]))]
    assert err[-1] == (f"privbench: error: 2 of 2 runs failed: {ids[0]} (see the error above), {ids[1]} "
                       "(see the error above); run the same command again to retry them")
    assert Store(out).runs().empty


FAKE_SBATCH = """#!/bin/sh
cp "$1" "{folder}/sbatch-script.sh"
echo "Submitted batch job 4242"
"""
FAKE_SACCT = """#!/bin/sh
printf 'JobID|State|NodeList\\n4242_0|PENDING|\\n4242_1|PENDING|\\n'
"""


@pytest.mark.parametrize("gpus, tasks, cpus_per_task", [(1, 1, 4), (2, 2, 2)])
def test_slurm_submits_one_job_array_with_the_requested_resources(tmp_path, capsys, monkeypatch, gpus, tasks,
                                                                   cpus_per_task):
    import submitit

    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    for name, text in [("sbatch", FAKE_SBATCH.format(folder=tmp_path)), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\n")]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert cli.main(["sweep", "--method", "dp-merf", "--eps", "1,10", "--executor", "slurm", "--slurm-partition", "gpu",
                     "--slurm-time", "30", "--slurm-gpus", str(gpus), "--slurm-cpus", "4", "--slurm-mem", "16",
                     "--slurm-array-parallelism", "1", "--out", str(out), *CHEAP_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "4242_0" in printed and "4242_1" in printed and "PENDING" in printed

    script = (tmp_path / "sbatch-script.sh").read_text()
    for flag in ["--array=0-1%1", "--partition=gpu", "--time=30", f"--gpus-per-node={gpus}", f"--ntasks-per-node={tasks}",
                 f"--cpus-per-task={cpus_per_task}", "--mem=16GB", "--job-name=privbench"]:
        assert f"#SBATCH {flag}\n" in script
    (folder,) = (out / "sweeps").iterdir()
    manifest = json.loads((folder / "sweep.json").read_text())
    assert manifest["executor"] == "slurm" and manifest["settings"]["partition"] == "gpu"
    assert [r["job_id"] for r in manifest["runs"]] == ["4242_0", "4242_1"]
    # Each array task carries its run's configuration, on CUDA: auto means the GPU the job asks for.
    for entry, epsilon in zip(manifest["runs"], (1.0, 10.0)):
        (config,), root, audit = submitit.core.utils.DelayedSubmission.load(folder / f"{entry['job_id']}_submitted.pkl").args
        assert (config.run_id, config.epsilon, config.device, audit) == (entry["run_id"], epsilon, "cuda", True)
        assert root == str(out.resolve())
    assert not (out / "runs").exists()  # submitted, nothing ran here


def _slurm_task(rank, config, root, port):
    """One of a SLURM job's two tasks, with the variables srun gives each task."""
    import os

    os.environ.update({"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
                       "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost",
                       "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    assert sweep.run_job([config], root, audit=False) == [config.run_id]


def test_a_slurm_job_of_two_tasks_trains_one_run_data_parallel(tmp_path):
    import socket

    import torch.multiprocessing as mp

    (config,) = cheap_grid(epsilons=(10.0,))
    with socket.socket() as s:  # a free port for the tasks' rendezvous
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    tasks = mp.spawn(_slurm_task, args=(config, str(tmp_path), port), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not tasks.join(timeout=5):  # tasks waiting on each other (both taking the run's lock) would hang
        if time.monotonic() > deadline:
            for process in tasks.processes:
                process.kill()
            pytest.fail("the job's two tasks did not finish within 300 s")
    runs = Store(tmp_path).runs()
    assert list(runs["run_id"]) == [config.run_id] and runs.iloc[0]["device"] == "cpu x2"
    assert 9.9 <= runs.iloc[0]["epsilon"] <= 10.0


def test_submitit_local_sweep_runs_in_two_processes_into_one_database(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sweep", "--method", "dp-merf", "--eps", "1,10", "--no-audit", "--quiet", "--out", str(out), *CHEAP_FLAGS]
    assert cli.main([*argv, "--executor", "submitit-local", "--workers", "2", "--wait"]) == 0
    printed = capsys.readouterr().out
    assert "| dp-merf" in printed and "ε=1 spent" in printed and "ε=10 spent" in printed

    runs = Store(out).runs().set_index("target_epsilon")
    assert sorted(runs.index) == [1.0, 10.0]
    for target, row in runs.iterrows():
        assert 0.99 * target <= row["epsilon"] <= target * (1 + 1e-6)
        assert row["fid"] > 0 and not math.isnan(row["ca"])
    (folder,) = (out / "sweeps").iterdir()
    manifest = json.loads((folder / "sweep.json").read_text())
    assert manifest["executor"] == "submitit-local" and manifest["settings"] == {"workers": 2}
    assert {r["run_id"] for r in manifest["runs"]} == set(runs["run_id"])
    assert len({r["job_id"] for r in manifest["runs"]}) == 2  # one process per run
    assert all("finished" in (folder / f"{r['job_id']}_0_log.err").read_text() for r in manifest["runs"])

    # The same sweep again, in this process: both runs are in the database, nothing runs twice.
    assert cli.main([*argv, "--executor", "local"]) == 0
    assert "| dp-merf" in capsys.readouterr().out
    assert len(Store(out).runs()) == 2


def test_waiting_for_a_failed_job_names_its_run_and_its_log(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sweep", "--method", "dp-merf", "--dataset", "cifar10", "--eps", "1", "--no-audit", "--quiet",
                     "--set", f"data.path={tmp_path / 'missing'}", "--executor", "submitit-local", "--wait",
                     "--out", str(out), *CHEAP_FLAGS]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    (folder,) = (out / "sweeps").iterdir()
    (entry,) = json.loads((folder / "sweep.json").read_text())["runs"]
    assert error == (f"privbench: error: 1 of 1 runs failed: {entry['run_id']} (log {entry['stderr']}); "
                     "run the same command again to retry them")
    assert "not found at" in (folder / f"{entry['job_id']}_0_log.err").read_text()
