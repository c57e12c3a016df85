"""The `privbench` command: run, audit, rescore, export, check, table, sweep, bench, gpu-check, data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from privbench.errors import PrivbenchError
from privbench.runtime import console_logging

DEFAULT_OUT = "privbench-runs"


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PrivbenchError(f"--eps {text!r} is not a comma-separated list of numbers: write e.g. --eps 1,10") from None
    if not values:
        raise PrivbenchError("--eps is empty: write e.g. --eps 1,10 (inf for no privacy)")
    for eps in values:
        if not eps > 0:
            raise PrivbenchError(f"epsilon must be > 0 (or inf for no privacy), got {eps:g}: pass e.g. --eps 1,10")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def cmd_run(args) -> int:
    from privbench.config import parse_overrides, resolve
    from privbench.dp.distributed import current_world
    from privbench.harness import run
    from privbench.runtime import resolve_device
    from privbench.methods import METHODS
    from privbench.report import render
    from privbench.report.canary_table import canary_rows, render_canary_table
    from privbench.report.tables import is_canary_run
    from privbench.store import Store

    methods = [METHODS.get(m) for m in _names(args.method)]
    overrides = parse_overrides(args.set or [])
    device = str(resolve_device(args.device))
    configs = [
        resolve(method, args.dataset, eps, seed, args.preset, device, overrides)
        for method in methods for eps in _epsilons(args.eps) for seed in _seeds(args.seed)
    ]
    configs = _not_in_cells(configs, args.cells)
    if not configs:
        return 0
    store = Store(args.out)
    done = [run(config, store, progress=not args.quiet, audit=not args.no_audit, score_fidelity=not args.no_fidelity)["run_id"]
            for config in configs]
    if not current_world().main:
        return 0  # torchrun: rank 0 reports
    runs = store.runs()
    runs = runs[runs["run_id"].isin(done)]
    if is_canary_run(runs).any():
        print(render_canary_table(canary_rows([args.out]).query("run_id in @done"), "md"))
    if not is_canary_run(runs).all():
        print(render(runs, "md"))
    print(f"results: {store.db_path} (all runs: privbench table --out {args.out})")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        return [int(v) for v in _names(text)]
    except ValueError:
        raise PrivbenchError(f"--seed {text!r} is not a comma-separated list of integers: write e.g. --seed 0,1,2") from None


def _not_in_cells(configs: list, cells: list[str] | None) -> list:
    """The configurations whose run is not already in one of the committed `cells` CSVs."""
    from privbench.report.sources import from_cells

    have = {run_id: path for path in cells or [] for run_id in from_cells(path).runs["run_id"]}
    for config in configs:
        if config.run_id in have:
            print(f"skipped {config.run_id}: already in {have[config.run_id]}")
    return [c for c in configs if c.run_id not in have]


def cmd_sweep(args) -> int:
    """Every (method, dataset, epsilon, seed) as a run: here, or as jobs (see privbench.sweep)."""
    import shlex

    from privbench import sweep
    from privbench.config import parse_overrides
    from privbench.report import render
    from privbench.store import Store

    slurm = sweep.SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_gpus, args.slurm_cpus, args.slurm_mem,
                               args.slurm_array_parallelism)
    sweep.check_executor(args.executor, args.workers)
    configs = sweep.expand(_names(args.method), _names(args.dataset), _epsilons(args.eps), _seeds(args.seed), args.preset,
                           sweep.device_for(args.executor, args.device, slurm.gpus), parse_overrides(args.set or []))
    configs = _not_in_cells(configs, args.cells)
    if args.dry_run:
        print(sweep.plan(configs, args.out))
        return 0
    store = Store(args.out)
    if args.executor == "local":
        failed = sweep.run_each(configs, store, progress=not args.quiet, audit=not args.no_audit)
    else:
        submission = sweep.submit(configs, store, args.executor, not args.no_audit, args.workers, slurm,
                                  command=shlex.join(["privbench", *sys.argv[1:]]))
        print(submission.table())
        print(f"jobs' files and logs: {submission.folder} (listed in its sweep.json)")
        if not args.wait:
            print(f"the jobs write to {store.db_path}; when they are done: privbench table --out {args.out}")
            return 0
        failed = submission.wait(store)
    finished = [c.run_id for c in configs if c.run_id not in failed]
    if finished:
        runs = store.runs()
        print(render(runs[runs["run_id"].isin(finished)], "md"))
        print(f"results: {store.db_path} (all runs: privbench table --out {args.out})")
    if failed:
        raise PrivbenchError(sweep.failure_message(failed, len(configs)))
    return 0


def cmd_audit(args) -> int:
    from privbench.harness import reaudit
    from privbench.metrics.names import is_attack_tpr
    from privbench.store import Store

    if not (Path(args.out) / "results.sqlite").exists():
        raise PrivbenchError(f"no results database in {args.out}: run `privbench run` first or pass --out DIR")
    store = Store(args.out)
    for run_id in args.run_ids:
        metrics = reaudit(store, run_id, _names(args.attack) if args.attack else None, args.device)
        for name, (value, detail) in metrics.items():
            if is_attack_tpr(name):
                lo, hi = detail["tpr_at_fpr"]["0.1"]["interval"]
                print(f"{run_id} {detail['attack']}: TPR@10%FPR {value:.3f} [{lo:.3f}, {hi:.3f}], AUC {detail['auc']:.3f}, "
                      f"eps_lb {detail['epsilon_lower_bound']['epsilon']:.3g}")
    return 0


def cmd_rescore(args) -> int:
    from tqdm.auto import tqdm

    from privbench.harness import rescore
    from privbench.report.tables import cells, is_canary_run
    from privbench.store import Store

    if not (Path(args.out) / "results.sqlite").exists():
        raise PrivbenchError(f"no results database in {args.out}: run `privbench run` first or pass --out DIR")
    if bool(args.run_ids) == args.all:
        raise PrivbenchError("privbench rescore needs run ids or --all (every scored run of --out), not both")
    store = Store(args.out)
    runs = store.runs()
    run_ids = args.run_ids or list(runs.loc[~is_canary_run(runs), "run_id"])
    for run_id in tqdm(run_ids, desc="rescore", unit="run", disable=True if args.quiet else None):
        rescore(store, run_id, args.device, progress=not args.quiet)
    runs = store.runs()
    print(cells(runs[runs["run_id"].isin(run_ids)]).to_csv(index=False), end="")
    return 0


def cmd_export(args) -> int:
    from privbench.export import PRIVACY_FILE, export
    from privbench.store import Store

    if not (Path(args.out) / "results.sqlite").exists():
        raise PrivbenchError(f"no results database in {args.out}: run `privbench run` first or pass --out DIR")
    out = export(Store(args.out), args.run_id, args.n, args.to, args.format, args.device)
    print(f"{args.n} images of {args.run_id} in {out} ({args.format}); their privacy guarantee: {out / PRIVACY_FILE}")
    return 0


def cmd_check(args) -> int:
    """Exit 1 when an audited run's empirical lower bound exceeds its ledger's epsilon, when a canary
    run's one-run bound does or its white-box measurements contradict its recorded mechanism, or, with
    --against, when a number of a committed leaderboard moved beyond tolerance or its epsilon changed."""
    from privbench.metrics.names import CANARY_FAILURES, EPS_LB, EPS_LB_CANARY
    from privbench.store import Store

    database = Path(args.out) / "results.sqlite"
    if not args.against and not database.exists():
        raise PrivbenchError(f"no results database in {args.out}: run `privbench run` first or pass --out DIR")
    regressions = _check_against(args) if args.against else 0
    runs = Store(args.out).runs()
    failures = 0
    for bound, what in ((EPS_LB, "an attack"), (EPS_LB_CANARY, "its canaries")):
        if bound not in runs:
            continue
        above = runs[runs[bound] > runs["epsilon"]]
        for _, row in above.iterrows():
            print(f"ACCOUNTING FAILURE {row['run_id']}: {what} prove epsilon >= {row[bound]:.3g}, "
                  f"the ledger claims {row['epsilon']:.4g}")
        print(f"{int(runs[bound].notna().sum())} runs with {bound}, {len(above)} above their ledger's epsilon")
        failures += len(above)
    if CANARY_FAILURES in runs:
        contradicted = runs[runs[CANARY_FAILURES] > 0]
        for _, row in contradicted.iterrows():
            print(f"ACCOUNTING FAILURE {row['run_id']}: its canaries measure a mechanism other than the one recorded "
                  f"({_failed_checks(Path(args.out), row['run_id'])})")
        failures += len(contradicted)
    if EPS_LB not in runs and EPS_LB_CANARY not in runs:
        print(f"no audited runs in {args.out}: no accounting to check")
    return 1 if failures or regressions else 0


def _failed_checks(out: Path, run_id: str) -> str:
    """The failed mechanism checks of a canary run, in words, from its canaries.json."""
    from privbench.store import Store

    checks = json.loads((Store(out).run_dir(run_id) / "canaries.json").read_text())["mechanism_checks"]["checks"]
    words = {
        "sample_rate": lambda c: f"sample rate >= {c['interval'][0]:.3g}, recorded {c['recorded']:.3g}",
        "noise": lambda c: f"noise multiplier <= {c['upper']:.3g}, recorded {c['recorded']:.3g}",
        "influence": lambda c: f"one member moves the sum by >= {c['interval'][0]:.3g} C, clipping allows 1",
        "clipped_sum": lambda c: f"a noisy sum of norm {c['measured']:.4g} C, clipping and noise allow {c['bound']:.4g}",
    }
    return "; ".join(words[name](c) for name, c in checks.items() if c["fails"])


def _check_against(args) -> int:
    """Re-run (with --rerun) and compare the selected cells of a leaderboard CSV; the number of failures."""
    from tabulate import tabulate

    from privbench.config import resolve
    from privbench.harness import run
    from privbench.methods import METHODS
    from privbench.report.regression import (
        board_tolerances, cell_name, compare, compared_metrics, load_cells, parse_tolerances,
    )
    from privbench.report.tables import cells
    from privbench.store import Store

    expected = load_cells(args.against)
    tolerances = parse_tolerances(args.tolerance, board_tolerances(args.against))
    if args.method:
        methods = [METHODS.get(m).name for m in _names(args.method)]
        expected = expected[expected["method"].isin(methods)]
    if args.eps:
        expected = expected[expected["target_epsilon"].isin(_epsilons(args.eps))]
    if expected.empty:
        raise PrivbenchError(f"no cell of {args.against} matches --method/--eps: see its rows for what it holds")
    store = Store(args.out)
    if args.rerun:
        for _, row in expected.iterrows():
            config = resolve(METHODS.get(row["method"]), row["dataset"], float(row["target_epsilon"]), int(row["seed"]),
                             row["preset"], args.device, {})
            if config.digest() != row["config_hash"]:
                print(f"not re-run: {cell_name(row)} now resolves to config {config.digest()}, the leaderboard's is {row['config_hash']}")
                continue
            run(config, store, progress=not args.quiet)
    actual = cells(store.runs())
    report = compare(expected, actual, tolerances)
    failed = report[~report["ok"]]
    shown = report if args.verbose_diff else failed
    if not shown.empty:
        print(tabulate(shown.astype(object).fillna(""), headers="keys", showindex=False, floatfmt=".6g"))
    print(f"{args.against}: {len(expected)} cells, {report['ok'].sum()} of {len(report)} numbers within tolerance, "
          f"{len(failed)} not")
    if skipped := compared_metrics(expected, actual, tolerances)[1]:
        print(f"not compared (absent from {args.against} or without a measured tolerance): {', '.join(skipped)}")
    return len(failed)


def cmd_table(args) -> int:
    """The leaderboard, or with --paper the comparison with a paper's numbers; with --plots, figures too.

    Runs come from every --out database and every --cells file (privbench.report.sources), each run
    once; with --format csv and --output, the cells are written with their costs and sample grids, so
    that a later session can build on them with --cells."""
    from privbench.report import render
    from privbench.report.findings import paper_ordering, privacy_price
    from privbench.report.sources import gather, write_cells
    from privbench.store import write_atomic

    outs = args.out or ([] if args.cells else [DEFAULT_OUT])
    datasets = _names(args.dataset) if args.dataset else None
    # the comparison with a paper shows its numbers even where no run is, and with no source named and
    # no default database (a fresh clone) it shows them alone
    published_alone = (args.paper and not (args.out or args.cells or args.canaries or args.plots)
                       and not (Path(DEFAULT_OUT) / "results.sqlite").exists())
    board = None if published_alone else gather(outs, args.cells or []).only(
        _names(args.preset) if args.preset else None, None if args.paper else datasets,
        _names(args.method) if args.method else None)
    runs = None if board is None else board.runs
    if args.canaries:
        from privbench.report.canary_table import canary_rows, render_canary_table

        text = render_canary_table(canary_rows(outs), args.format)
    elif args.paper:
        from privbench.report.paper import load_published, side_by_side

        published = load_published(args.paper)
        if datasets:
            published = published[published["dataset"].isin(datasets)]
        if published.empty:
            raise PrivbenchError(f"{args.paper} has no published numbers{' on ' + args.dataset if datasets else ''}: "
                                 "choose another --paper or --dataset")
        text = side_by_side(runs, published, args.format)
    else:
        text = render(runs, args.format, datasets, costs=board.costs,
                      notes=lambda dataset_runs: privacy_price(dataset_runs) + paper_ordering(dataset_runs),
                      metrics=tuple(_names(args.metrics)) if args.metrics else ())
    if args.output and args.format == "csv" and not (args.paper or args.canaries):
        write_cells(board, args.output, text)
    elif args.output:
        write_atomic(Path(args.output), text)
    else:
        print(text)
    if args.plots:
        from privbench.report.plots import write_plots

        for path in write_plots(runs[runs["dataset"].isin(datasets)] if datasets else runs, args.plots):
            print(path)
    return 0


def cmd_bench(args) -> int:
    """Print the measurements (and the paper projection) as markdown; append them to the perf log."""
    from privbench.bench import BenchOptions, append_report, render, run_bench, to_json
    from privbench.store import write_atomic

    options = BenchOptions(device=args.device, preset=args.preset, batch=args.batch, steps=args.steps,
                           warmup=args.warmup, modes=tuple(_names(args.modes)), multiplicity=args.multiplicity,
                           precision=args.precision, method=args.method, inception_stand_in=args.inception_stand_in)
    report = run_bench(options)
    text = render(report)
    print(text)
    if args.json:
        write_atomic(Path(args.json), to_json(report))
    if not args.no_append:
        print(f"appended to {append_report(Path(args.append), text)}")
    return 0


def cmd_gpu_check(args) -> int:
    """prepare (here), run (on the device, or --dry-run on the CPU), score (here): see privbench.gpu_check."""
    from privbench import gpu_check

    if args.action == "prepare":
        manifest = gpu_check.prepare(Path(args.carried), Path(args.cifar10), Path(args.tiny_imagenet))
        print(f"{args.carried}: CIFAR-10 {manifest['cifar10']['images']}, Tiny-ImageNet {manifest['tiny-imagenet']['images']}, "
              f"the FID network's stand-in, {gpu_check.MANIFEST} (commit {manifest['commit']})")
        return 0
    if args.action == "score":
        text = gpu_check.score(Path(args.results), Path(args.carried), args.device, progress=not args.quiet)
        print(text)
        if args.append:
            print(f"appended the device's section and these scores to {gpu_check.append_scored(Path(args.results), text, Path(args.append))}")
        return 0
    device = args.device or ("cpu" if args.dry_run else "cuda")
    results = gpu_check.run_check(Path(args.out), device, Path(args.carried), args.dry_run, Path.cwd())
    return 0 if all(r.ok for r in results) else 1


def cmd_data(args) -> int:
    from privbench import data

    if args.action == "list":
        for name in data.DATASETS.names():
            spec = data.DATASETS.get(name)
            origin = "embedded" if spec.embedded else ("downloadable" if spec.downloadable else "manual")
            print(f"{name:14} {spec.role:9} {spec.native_resolution:>3}px x{spec.channels} {origin:12} {spec.description}")
            if not spec.embedded:
                print(f"{'':14} files: {spec.where}")
        print(f"real datasets are looked for under {data.data_root()}/<name> (set PRIVBENCH_DATA to move it)")
        return 0
    if not args.names:
        raise PrivbenchError(f"privbench data {args.action} needs dataset names, e.g. privbench data {args.action} cifar10")
    for name in args.names:
        if args.action == "verify":
            print(data.verify(name, args.path))
        else:
            print(f"{name}: downloaded to {data.download(name, args.path)}")
    return 0


def _grid_arguments(p: argparse.ArgumentParser, dataset_help: str, device_help: str) -> None:
    """What `run` and `sweep` share: the grid of runs and how each run is done."""
    p.add_argument("--method", required=True, help="method name(s), comma-separated, e.g. dp-merf")
    p.add_argument("--dataset", default="mnist", help=dataset_help)
    p.add_argument("--eps", required=True, help="target epsilons, comma-separated, e.g. 1,10 (inf: no privacy)")
    p.add_argument("--preset", default="smoke", help="smoke (CPU minutes, tests and CI), cpu (the CPU tier), small (one GPU) or paper")
    p.add_argument("--seed", default="0", help="seed(s), comma-separated")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. eval.samples=500 (repeatable)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results root: database, run directories, caches (default {DEFAULT_OUT})")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars and no log lines, only the tables")
    p.add_argument("--no-audit", action="store_true", help="skip the membership-inference audit")
    p.add_argument("--cells", action="append", metavar="FILE.csv", help="skip the runs already in this committed cells "
                   "CSV (repeatable), e.g. leaderboards/cpu/mnist.csv")


def parser() -> argparse.ArgumentParser:
    from privbench.gpu_check import CARRIED, SOURCES

    p = argparse.ArgumentParser(prog="privbench", description="Benchmark differentially private synthetic image generation.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debugging details to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run methods at several epsilons and print their leaderboard")
    _grid_arguments(r, "sensitive dataset (default: the embedded mnist, paired with glyphs)", "auto, cpu or cuda")
    r.add_argument("--no-fidelity", action="store_true", help="score no FID or other fidelity metric (they need the "
                   "Inception weights); `privbench rescore` adds them later from the saved samples")
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("audit", help="re-audit finished runs with membership-inference attacks")
    a.add_argument("run_ids", nargs="+", metavar="RUN", help="run id(s), as in the run directory names")
    a.add_argument("--attack", help="attack name(s), comma-separated (default: the run's configured attacks)")
    a.add_argument("--out", default=DEFAULT_OUT, help="results root holding results.sqlite")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda")
    a.set_defaults(func=cmd_audit)

    o = sub.add_parser("rescore", help="score finished runs' saved samples again with every fidelity metric of this "
                       "version (FID, KID, precision/recall, density/coverage, memorisation, per class, FD_DINOv2)")
    o.add_argument("run_ids", nargs="*", metavar="RUN", help="run id(s), as in the run directory names")
    o.add_argument("--all", action="store_true", help="every scored run of the database")
    o.add_argument("--out", default=DEFAULT_OUT, help="results root holding results.sqlite")
    o.add_argument("--device", default="auto", help="auto, cpu or cuda")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.set_defaults(func=cmd_rescore)

    e = sub.add_parser("export", help="draw images from a finished run's synthesizer into a folder, with PRIVACY.json")
    e.add_argument("run_id", metavar="RUN", help="run id, as in the run directory names")
    e.add_argument("--n", type=int, required=True, help="how many images to draw (post-processing: spends no budget)")
    e.add_argument("--out", dest="to", required=True, metavar="DIR", help="a new (or empty) directory to write them to")
    e.add_argument("--format", default="imagefolder", choices=["imagefolder", "npz"],
                   help="imagefolder (<class>/<i>.png, default) or npz (samples.npz: images, labels, classes)")
    e.add_argument("--runs", dest="out", default=DEFAULT_OUT, help=f"results root holding the run (default {DEFAULT_OUT})")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("check", help="fail on an accounting failure (eps_lb > eps) or, with --against, a metric regression")
    c.add_argument("--out", default=DEFAULT_OUT, help="results root holding results.sqlite")
    c.add_argument("--against", metavar="CSV", help="a committed leaderboard CSV, e.g. leaderboards/smoke/mnist.csv")
    c.add_argument("--rerun", action="store_true", help="first run the selected cells of --against (resumable, into --out)")
    c.add_argument("--method", help="only these methods' cells of --against, comma-separated")
    c.add_argument("--eps", help="only these target epsilons' cells of --against, comma-separated")
    c.add_argument("--tolerance", metavar="M=X,...", help="override tolerances, e.g. fid=0.5,ca=0.005 "
                   "(defaults: the board's CSV-tolerances.yaml beside it, else privbench/report/regression.py)")
    c.add_argument("--device", default="cpu", help="device of re-runs (the leaderboard's, cpu for smoke)")
    c.add_argument("--quiet", action="store_true", help="no progress bars or log lines during re-runs")
    c.add_argument("--verbose-diff", action="store_true", help="print every compared number, not only failures")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("sweep", help="every method x dataset x epsilon x seed as a run: here, as local processes or SLURM jobs")
    _grid_arguments(s, "sensitive dataset(s), comma-separated", "auto, cpu or cuda (slurm: auto is cuda when --slurm-gpus > 0)")
    s.add_argument("--executor", default="local", help="local (one after another here), submitit-local (--workers "
                   "processes here) or slurm (a job array; --out must be on a filesystem the nodes share)")
    s.add_argument("--workers", type=int, default=1, help="submitit-local: runs at once (on CUDA, one GPU each)")
    s.add_argument("--wait", action="store_true", help="wait for the jobs, print their leaderboard, fail if a run failed")
    s.add_argument("--dry-run", action="store_true", help="print the runs the sweep expands to; run and write nothing")
    s.add_argument("--slurm-partition", help="SLURM partition (default: the cluster's)")
    s.add_argument("--slurm-time", type=int, default=120, help="time limit per run, minutes (default 120)")
    s.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per job (default 1; 0 runs on CPU; N > 1: N tasks training data-parallel)")
    s.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per job (default 8)")
    s.add_argument("--slurm-mem", type=float, default=64, help="memory per job, GB (default 64)")
    s.add_argument("--slurm-array-parallelism", type=int, help="at most this many jobs at once")
    s.set_defaults(func=cmd_sweep)

    t = sub.add_parser("table", help="leaderboards from the results database")
    t.add_argument("--out", action="append", help=f"results root holding results.sqlite (repeatable; default {DEFAULT_OUT} "
                   "unless --cells is given)")
    t.add_argument("--cells", action="append", metavar="FILE.csv", help="also the runs of a committed cells CSV, with its "
                   "-costs.csv and grids/ beside it (repeatable); a run in several sources is taken from the first")
    t.add_argument("--format", default="md", choices=["md", "csv", "latex"])
    t.add_argument("--dataset", help="only these datasets, comma-separated")
    t.add_argument("--preset", help="only runs of these presets, comma-separated")
    t.add_argument("--method", help="only runs of these methods, comma-separated (e.g. to keep a board's cells of one "
                   "method when the others are re-run)")
    t.add_argument("--output", help="write the table to this file instead of printing it (csv: with FILE-costs.csv and "
                   "grids/ beside it)")
    t.add_argument("--canaries", action="store_true",
                   help="instead, the canary audit table: every canary run's one-run bounds and mechanism checks")
    t.add_argument("--paper", metavar="NAME", help="instead, compare with a paper's published numbers: a name in "
                   "leaderboards/paper/ (e.g. dpimagebench) or a CSV path")
    t.add_argument("--metrics", help="also these metrics, comma-separated, beside the headline FID and CA (md, latex) "
                   "and the scores every CSV holds (csv): e.g. kid,density,coverage,memorisation,fd_dinov2, per class ca/3")
    t.add_argument("--plots", metavar="DIR", help="also write FID/CA-vs-epsilon plots and sample sheets here")
    t.set_defaults(func=cmd_table)

    b = sub.add_parser("bench", help="time training, DP-SGD, sampling and FID features here; project the paper preset's cost")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda")
    b.add_argument("--preset", default="paper", help="whose UNet and classifiers: smoke, cpu, small or paper (paper also projects)")
    b.add_argument("--batch", type=int, help="physical batch of every stage (default: the preset's DP physical batch)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    b.add_argument("--modes", default="functorch,hooks,ghost,bookkeeping", help="DP-SGD grad-sample modes, comma-separated")
    b.add_argument("--multiplicity", type=int, default=1, help="also time DP-SGD at this K (not ghost); K = 1 is always timed")
    b.add_argument("--precision", help="fp32 or bf16 (default: the preset's compute.precision)")
    b.add_argument("--method", default="privimage", help="the diffusion method whose UNet, DP-SGD settings and paper "
                   "workload are used: privimage, pdp-diffusion or dpdm (default %(default)s)")
    b.add_argument("--inception-stand-in", metavar="FILE", help="time FID features with random weights of the FID "
                   "network from this file (`privbench gpu-check prepare` writes one), where the real weights are not installed")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to this file as JSON")
    where = b.add_mutually_exclusive_group()
    where.add_argument("--append", default="leaderboards/perf.md", metavar="FILE", help="append the results here (default %(default)s)")
    where.add_argument("--no-append", action="store_true", help="only print the results")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("gpu-check", help="the GPU check: prepare its carried files here, run it on a GPU (or "
                       "--dry-run on the CPU), score the samples it returns")
    actions = g.add_subparsers(dest="action", required=True)
    gp = actions.add_parser("prepare", help="write the carried folder: data subsets, the FID network's stand-in, a "
                            "manifest (scripts/gpu-check prepare adds the wheels)")
    gp.add_argument("--cifar10", default=str(SOURCES["cifar10"]), metavar="ZIP",
                    help="CIFAR-10 as an ImageFolder zip (default %(default)s)")
    gp.add_argument("--tiny-imagenet", default=str(SOURCES["tiny-imagenet"]), metavar="ZIP",
                    help="Tiny-ImageNet as an ImageFolder zip (default %(default)s)")
    gr = actions.add_parser("run", help="every step of the check into --out: tests, bench, one PrivImage run")
    gr.add_argument("--out", required=True, help="where the log, perf.md, results.json and e2e/ go ($OUT on the device)")
    gr.add_argument("--device", help="cuda[:N] (default), or cpu")
    gr.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU (CI)")
    gs = actions.add_parser("score", help="FID and the other fidelity scores of the samples a device run returned")
    gs.add_argument("results", metavar="DIR", help="the device run's output folder (its --out)")
    gs.add_argument("--device", default="auto", help="auto, cpu or cuda")
    gs.add_argument("--append", metavar="FILE", help="append the device's perf.md section and these scores to this "
                    "perf log, e.g. leaderboards/perf.md")
    gs.add_argument("--quiet", action="store_true", help="no progress bars")
    for action in (gp, gr, gs):
        action.add_argument("--carried", default=str(CARRIED), help="the carried folder (default %(default)s)")
    g.set_defaults(func=cmd_gpu_check)

    d = sub.add_parser("data", help="list, verify or download datasets")
    d.add_argument("action", choices=["list", "verify", "download"])
    d.add_argument("names", nargs="*", help="dataset names (verify, download)")
    d.add_argument("--path", help="where the files are (default: $PRIVBENCH_DATA/<name>)")
    d.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console_logging(args.verbose, getattr(args, "quiet", False))
    try:
        return args.func(args)
    except PrivbenchError as e:
        print(f"privbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privbench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
