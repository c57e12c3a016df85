"""`privbench gpu-check`: a prepared proof that privbench's GPU path is correct and fast, made to fit a
borrowed GPU's few minutes, and its dry run on the CPU.

  prepare  (here, scripts/gpu-check prepare) the carried folder: a CIFAR-10 and a Tiny-ImageNet subset
           in the layout the readers take, the FID network's stand-in, a manifest (the wheels: the script)
  run      (on the device, scripts/gpu-check device) the steps below, each a subprocess with a hard time
           budget; a step that fails or overruns is recorded with its output and the next one runs
  score    (here again) FID and the other fidelity scores of the samples the device returned, with the
           real Inception weights, which the device cannot have (87 MB, over what a call carries)

The steps (sizes in privbench/gpu_check.yaml):
  tests  the DP engine's device-parametrised tests with PRIVBENCH_TEST_DEVICE set (tests/conftest.py)
  bench  `privbench bench`: each clipping mode's DP-SGD step against the non-private one, and FID features
         with random weights of the FID network (the time of the network, not its features)
  e2e    one PrivImage run on the carried subsets: query, pre-training, DP-SGD, sampling, CA and the audit
         on the device; its samples come back for `score`
Everything lands in the output folder: gpu-check.log (every step's output), perf.md (the section for
leaderboards/perf.md), results.json, and e2e/ (the run's samples, config, metrics and log).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import IO, Any

import yaml

from privbench.errors import PrivbenchError

CARRIED = Path(".gpucheck")
CIFAR10, TINY_IMAGENET, STAND_IN, MANIFEST = "cifar10.zip", "tiny-imagenet.zip", "inception-stand-in.pt.gz", "manifest.json"
SOURCES = {"cifar10": Path("../shared/data/cifar10-jpeg.zip"), "tiny-imagenet": Path("../shared/data/tiny-imagenet-200-jpeg.zip")}
LOG, PERF, RESULTS, E2E = "gpu-check.log", "perf.md", "results.json", "e2e"
# What comes back of the end-to-end run (the device returns at most 8 files, two folders down, with the three above).
E2E_FILES = ("samples.npz", "config.yaml", "metrics.json", "log.txt", "samples.png")
TEST_DEVICE = "PRIVBENCH_TEST_DEVICE"  # read by tests/conftest.py
RATIO_TARGET = 1.1  # the best clipping mode's DP-SGD step at most 1.1x the non-private one (recorded, not gated)
FID_IMAGES = 50_000  # the projection of FID features' time: 50,000 images
OUTPUT_TAIL = 60  # lines of a failed step's output in perf.md (the whole output is in the log)


def settings() -> dict[str, Any]:
    return yaml.safe_load(resources.files("privbench").joinpath("gpu_check.yaml").read_text())


# --- prepare ----------------------------------------------------------------------------------------


def copy_subset(source: Path, dest: Path, per_class: dict[str, int], classes: int | None = None) -> dict[str, int]:
    """The first `per_class[split]` images by file name of each class of `source`'s splits (of its first
    `classes` class folders, all if None), their bytes unchanged, into the zip `dest`; images per split."""
    from privbench.data.files import open_tree
    from privbench.data.imagefolder import class_folders

    tree = open_tree(source, "train")
    if tree is None:
        raise PrivbenchError(f"{source} is not an ImageFolder zip or folder (train/<class>/...): pass the development "
                             "copy from ../shared/data")
    counts = {}
    partial = dest.with_suffix(".partial")
    with tree, zipfile.ZipFile(partial, "w") as out:
        names = sorted(class_folders(tree, "train"))[:classes]
        for split, n in per_class.items():
            found = class_folders(tree, split)
            chosen = [f for c in names for f in sorted(found.get(c, []))[:n]]
            for name in chosen:
                out.writestr(name, tree.read(name))
            counts[split] = len(chosen)
    partial.replace(dest)
    return counts


def prepare(carried: Path, cifar10: Path, tiny_imagenet: Path) -> dict[str, Any]:
    """Write the carried folder's data subsets, the FID network's stand-in and the manifest; the manifest."""
    from privbench.metrics.inception import write_stand_in
    from privbench.store import commit_id, write_json

    for name, path in (("--cifar10", cifar10), ("--tiny-imagenet", tiny_imagenet)):
        if not path.exists():
            raise PrivbenchError(f"{name} {path} does not exist: pass the development copy (../shared/data) or an "
                                 "ImageFolder zip like it")
    sizes = settings()["carried"]
    carried.mkdir(parents=True, exist_ok=True)
    c, t = sizes["cifar10"], sizes["tiny_imagenet"]
    manifest = {
        "commit": commit_id(),
        "made": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cifar10": {"source": str(cifar10), "images": copy_subset(
            cifar10, carried / CIFAR10, {"train": c["train_per_class"], "test": c["test_per_class"]})},
        "tiny-imagenet": {"source": str(tiny_imagenet), "images": copy_subset(
            tiny_imagenet, carried / TINY_IMAGENET, {"train": t["train_per_class"]}, t["classes"])},
    }
    write_stand_in(carried / STAND_IN)
    write_json(carried / MANIFEST, manifest)
    return manifest


def carried_manifest(carried: Path) -> dict[str, Any]:
    """The carried folder's manifest, once every file it needs is there; else the error saying how to make it."""
    missing = [name for name in (MANIFEST, CIFAR10, TINY_IMAGENET, STAND_IN) if not (carried / name).is_file()]
    if missing:
        raise PrivbenchError(f"the carried folder {carried} lacks {', '.join(missing)}: make it with "
                             f"`scripts/gpu-check prepare` (or `privbench gpu-check prepare --carried {carried}`)")
    return json.loads((carried / MANIFEST).read_text())


# --- steps ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    budget_s: float
    env: tuple[tuple[str, str], ...] = ()

    @property
    def command(self) -> str:
        """The command as one types it: `privbench ...` or `pytest ...` (they run as `python -P -m ...`)."""
        args = list(self.argv[self.argv.index("-m") + 1:]) if "-m" in self.argv else list(self.argv)
        args[0] = "privbench" if args[0] == "privbench.cli" else args[0]
        return " ".join([*(f"{k}={v}" for k, v in self.env), shlex.join(args)])


@dataclass
class StepResult:
    name: str
    command: str
    budget_s: float
    status: str = "skipped"  # passed | failed | timed out | skipped
    seconds: float = 0.0
    returncode: int | None = None
    summary: str = ""  # one line: what the step measured, or why it failed
    details: str = ""  # markdown for perf.md
    error: str = ""  # the tail of a failed step's output (its traceback), or the check's own traceback
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "passed"


def python_module(*args: str) -> tuple[str, ...]:
    """`python -P -m ...`: -P keeps the working directory off sys.path, so that privbench is the installed
    one (the wheel on the device) and not the checkout's privbench/, which lacks methods/ and attacks/."""
    return (sys.executable, "-P", "-m", *args)


def plan(size: dict[str, Any], device: str, carried: Path, work: Path) -> list[Step]:
    """The steps at one size of privbench/gpu_check.yaml, on `device`, reading the carried folder."""
    tests, bench, e2e = size["tests"], size["bench"], size["e2e"]
    carried = carried.resolve()
    data = [f"data.path={carried / CIFAR10}", f"data.public_path={carried / TINY_IMAGENET}"]
    return [
        Step("tests", python_module("pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests["select"]), tests["budget_s"],
             ((TEST_DEVICE, device),)),
        Step("bench", python_module("privbench.cli", "bench", "--device", device, *bench["options"], "--inception-stand-in",
                                    str(carried / STAND_IN), "--json", str(work / "bench.json"), "--no-append"),
             bench["budget_s"]),
        Step("e2e", python_module("privbench.cli", "run", "--method", "privimage", "--dataset", "cifar10", "--preset",
                                  e2e["preset"], "--eps", str(e2e["epsilon"]), "--seed", "0", "--device", device,
                                  "--out", str(work / E2E), "--no-fidelity",
                                  *(a for s in [*data, *e2e["set"]] for a in ("--set", s))),
             e2e["budget_s"]),
    ]


def _tail(text: str, lines: int = OUTPUT_TAIL) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def execute(step: Step, work: Path, log: IO[str], timeout_s: float, cwd: Path | None = None) -> StepResult:
    """Run one step (in `cwd`) as its own process group, killed at `timeout_s`; its output is appended to `log`."""
    result = StepResult(step.name, step.command, step.budget_s)
    if timeout_s < 1:
        result.summary = "skipped: the check's time budget was spent"
        return result
    out_path, err_path = work / f"{step.name}.out", work / f"{step.name}.err"
    env = os.environ | dict(step.env) | {"PYTHONUNBUFFERED": "1"}
    log.write(f"\n===== {step.name}: {step.command} (budget {timeout_s:.0f} s)\n")
    log.flush()
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        try:
            process = subprocess.Popen(step.argv, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        except OSError:
            result.status, result.summary, result.error = "failed", "could not start", traceback.format_exc().rstrip()
            return result
        try:
            result.returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    result.seconds = time.perf_counter() - start
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    log.write(stdout + ("\n----- stderr\n" + stderr if stderr.strip() else ""))
    if result.returncode is None:
        result.status, result.summary = "timed out", f"killed after its budget of {timeout_s:.0f} s"
    elif result.returncode != 0:
        result.status, result.summary = "failed", f"exit code {result.returncode}"
    else:
        result.status = "passed"
    if not result.ok:
        result.error = _tail(stderr) if stderr.strip() else _tail(stdout)
    return result


def run_steps(steps: list[Step], work: Path, log: IO[str], budget_s: float,
              reporters: dict[str, Callable[[StepResult, Path], None]] | None = None,
              cwd: Path | None = None) -> list[StepResult]:
    """Every step in turn (in `cwd`), each within its budget and what is left of `budget_s`; a step that
    fails is recorded and the next one runs. `reporters[name](result, work)` reads a step's results into
    it; an exception there fails that step, with its traceback."""
    deadline = time.perf_counter() + budget_s
    results = []
    for step in steps:
        result = execute(step, work, log, min(step.budget_s, deadline - time.perf_counter()), cwd)
        report = (reporters or {}).get(step.name)
        if report is not None and result.status != "skipped":
            try:
                report(result, work)
            except Exception:  # noqa: BLE001  (recorded: the other steps still run)
                result.status, result.summary = "failed", f"{result.summary}; its results could not be read".lstrip("; ")
                result.error = "\n".join(filter(None, (result.error, traceback.format_exc().rstrip())))
        log.write(f"===== {step.name}: {result.status} in {result.seconds:.1f} s; {result.summary}\n")
        log.flush()
        print(f"gpu-check {step.name}: {result.status} in {result.seconds:.0f} s; {result.summary}", flush=True)
        results.append(result)
    return results


# --- what each step measured ------------------------------------------------------------------------


def report_tests(result: StepResult, work: Path) -> None:
    """pytest's last line (counts and time), and each failure's one-line reason (-rfE)."""
    lines = (work / "tests.out").read_text().strip().splitlines()
    outcome = lines[-1].strip("= ") if lines else "no output"
    result.summary = outcome if result.ok else f"{result.summary}: {outcome}"
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    result.details = "\n".join(f"- `{line}`" for line in failures)


def report_bench(result: StepResult, work: Path) -> None:
    """Each mode's DP/non-private ratio against RATIO_TARGET and FID features' throughput, from --json;
    the bench's own section, its headings below this step's, as details."""
    if not result.ok:
        return
    bench = json.loads((work / "bench.json").read_text())
    ratios = {m["variant"]: m["ratio"] for m in bench["measurements"]
              if m["stage"] == "DP-SGD step" and m["multiplicity"] == 1 and m["ratio"] is not None}
    features = next(m for m in bench["measurements"] if m["stage"] == "Inception features")
    parts = [", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in ratios.items())]
    if ratios:
        best = min(ratios, key=ratios.get)
        met = "met" if ratios[best] <= RATIO_TARGET else "not met"
        parts[0] = f"DP/non-private step: {parts[0]}; best {best} {ratios[best]:.2f}x (target <= {RATIO_TARGET}x: {met})"
        result.numbers |= {"ratios": ratios, "best_mode": best, "target_met": ratios[best] <= RATIO_TARGET}
    if features.get("images_per_s"):
        rate = features["images_per_s"]
        parts.append(f"FID features {rate:,.0f} images/s ({features['images']} per call), {FID_IMAGES:,} in "
                     f"{FID_IMAGES / rate:,.0f} s (random weights)")
        result.numbers |= {"inception_images_per_s": rate, "inception_50k_s": FID_IMAGES / rate}
    else:
        parts.append(f"FID features failed: {features['error']}")
    result.summary = "; ".join(parts)
    result.details = re.sub(r"^#", "###", (work / "bench.out").read_text().strip(), flags=re.M)


def report_e2e(out: Path) -> Callable[[StepResult, Path], None]:
    """The end-to-end run's CA, epsilon, audit bound and stage times; whatever files it wrote (all of
    them when it passed) copied to `out`/e2e."""

    def report(result: StepResult, work: Path) -> None:
        runs = sorted((work / E2E / "runs").glob("*/"))
        if not result.ok and not runs:
            return
        if len(runs) != 1:
            raise RuntimeError(f"expected one run in {work / E2E / 'runs'}, found {len(runs)}")
        run_dir = runs[0]
        (out / E2E).mkdir(parents=True, exist_ok=True)
        for name in E2E_FILES:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, out / E2E / name)
        if not result.ok:
            return
        metrics = {k: v["value"] for k, v in json.loads((run_dir / "metrics.json").read_text()).items()}
        epsilon = json.loads((run_dir / "ledger.json").read_text())["composed_epsilon"]
        stages = json.loads((run_dir / "costs.json").read_text())["stages"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        result.numbers |= {"run_id": run_dir.name, "ca": metrics["ca"], "epsilon": epsilon,
                           "eps_lb": metrics.get("eps_lb"), "stages_s": {s["name"]: s["wall_s"] for s in stages}}
        audit = f", audit eps_lb {metrics['eps_lb']:.3g}" if "eps_lb" in metrics else ""
        result.summary = (f"PrivImage, preset {config['preset']}: CA {metrics['ca']:.1%}, epsilon {epsilon:.4g} "
                          f"(target {config['epsilon']:g}){audit}; {config['eval']['samples']} samples in {E2E}/samples.npz")
        rows = "\n".join(f"| {s['name']} | {s['wall_s']:.1f} |" for s in stages)
        result.details = f"Run {run_dir.name}; its stages:\n\n| stage | seconds |\n|---|---|\n{rows}"

    return report


# --- the check --------------------------------------------------------------------------------------


def environment(device: Any) -> dict[str, str]:
    """Device, versions and the float32 arithmetic in force (TF32), for the record."""
    import torch

    found = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("opacus", "diffusers", "numpy"):
        found[dist] = metadata.version(dist)
    if device.type == "cuda":
        found |= {"device_name": torch.cuda.get_device_name(device), "cuda": str(torch.version.cuda),
                  "cudnn": str(torch.backends.cudnn.version()),
                  "tf32": f"matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}"}
    else:
        from privbench.bench.measure import device_name

        found["device_name"] = device_name(device)
    return found


def run_check(out: Path, device: str, carried: Path, dry_run: bool, repo: Path) -> list[StepResult]:
    """Every step at its size into `out` (log, perf.md, results.json, e2e/); checks the input first."""
    from privbench.runtime import resolve_device

    resolved = resolve_device(device)
    if dry_run and resolved.type != "cpu":
        raise PrivbenchError(f"--dry-run runs on the CPU: leave out --device {device} or pass --device cpu")
    manifest = carried_manifest(carried)
    if not (repo / "tests" / "conftest.py").is_file():
        raise PrivbenchError(f"{repo} holds no tests/conftest.py: run gpu-check from the privbench checkout")
    size = settings()["dry_run" if dry_run else "full"]
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    env = environment(resolved)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch, open(out / LOG, "w") as log:
        work = Path(scratch)
        log.write(f"privbench gpu-check on {env['device']} ({env['device_name']}), {'dry run' if dry_run else 'full'}; "
                  f"{json.dumps(env)}; carried: {json.dumps(manifest)}\n")
        results = run_steps(plan(size, str(resolved), carried, work), work, log, size["budget_s"],
                            {"tests": report_tests, "bench": report_bench, "e2e": report_e2e(out)}, cwd=repo)
    wall = (datetime.now(timezone.utc) - started).total_seconds()
    text = render(results, env, manifest, dry_run, size["budget_s"], wall, started)
    (out / PERF).write_text(text)
    (out / RESULTS).write_text(json.dumps({"environment": env, "manifest": manifest, "dry_run": dry_run, "wall_s": wall,
                                           "steps": [asdict(r) for r in results]}, indent=1))
    print(text)
    return results


def render(results: list[StepResult], env: dict[str, str], manifest: dict[str, Any], dry_run: bool, budget_s: float,
           wall_s: float, started: datetime) -> str:
    """The perf.md section: provenance, one row per step, each step's details and every failure's output."""
    kind = "dry run (tiny sizes, CPU)" if dry_run else "full"
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "cudnn", "opacus", "diffusers", "numpy")
                         if k in env)
    lines = [
        f"## {started:%Y-%m-%d %H:%M UTC}: gpu-check on {env['device']} ({env['device_name']}), {kind}",
        "",
        f"- command: `scripts/gpu-check {'dry-run' if dry_run else 'device'}` (`privbench gpu-check run --device "
        f"{env['device']}{' --dry-run' if dry_run else ''}`), {wall_s:.0f} s of the {budget_s:.0f} s budget for the steps",
        f"- privbench commit: {manifest.get('commit') or 'unknown'} (the wheel `scripts/gpu-check prepare` built, "
        f"{manifest.get('made', '')})",
        f"- versions: {versions}" + (f"; TF32: {env['tf32']} (PyTorch's defaults; the exactness tests turn it off)"
                                     if "tf32" in env else ""),
        f"- data: the carried subsets of CIFAR-10 ({_counts(manifest['cifar10'])}) and Tiny-ImageNet "
        f"({_counts(manifest['tiny-imagenet'])}), copies of the development data",
        "- FID features are timed with random weights of the FID network (the real ones, 87 MB, cannot be carried): "
        "its time, not its features; the samples' FID is computed on the CPU with the real weights "
        "(`privbench gpu-check score`)",
        "",
        "| step | status | seconds (budget) | result |",
        "|---|---|---|---|",
        *(f"| {r.name} | {r.status} | {r.seconds:.0f} ({r.budget_s:.0f}) | {r.summary} |" for r in results),
    ]
    for r in results:
        lines += ["", f"### {r.name}", "", f"`{r.command}`"]
        if r.details:
            lines += ["", r.details]
        if r.error:
            lines += ["", f"{r.status}; the end of its output:", "", "```", r.error, "```"]
    return "\n".join(lines) + "\n"


def _counts(entry: dict[str, Any]) -> str:
    return ", ".join(f"{n:,} {split}" for split, n in entry["images"].items())


# --- score ------------------------------------------------------------------------------------------


def score(results_dir: Path, carried: Path, device: str, progress: bool = False) -> str:
    """FID and every other fidelity score of the end-to-end samples a device returned, with the real
    Inception weights, against the carried CIFAR-10 subset's test images, as the run would have scored
    them (privbench.harness.fidelity, the run's own eval settings); a perf.md subsection."""
    import dataclasses

    from privbench.config import from_dict
    from privbench.harness import fidelity, load_data, saved_samples
    from privbench.methods import METHODS
    from privbench.runtime import resolve_device

    run_dir = results_dir / E2E
    missing = [name for name in ("config.yaml", "samples.npz") if not (run_dir / name).is_file()]
    if missing:
        raise PrivbenchError(f"{run_dir} lacks {', '.join(missing)}: the device's end-to-end step did not sample "
                             f"(see {results_dir / PERF})")
    carried_manifest(carried)
    resolved = resolve_device(device)
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    here = dataclasses.replace(config.data, path=str(carried / CIFAR10), public_path=str(carried / TINY_IMAGENET))
    config = dataclasses.replace(config, data=here)
    with tempfile.TemporaryDirectory(prefix="gpu-check-score-") as scratch:
        data = load_data(config, METHODS.get(config.method), Path(scratch), resolved)
        samples, _ = saved_samples(run_dir, config, data.train.classes)
        metrics = fidelity(config, data, samples, Path(scratch), Path(scratch), resolved, progress)
    shown = ("fid", "kid", "precision", "recall", "density", "coverage", "memorisation")
    values = ", ".join(f"{name} {metrics[name][0]:.4g}" for name in shown if name in metrics)
    e = config.eval
    return "\n".join([
        f"### e2e: fidelity of the returned samples, scored on {resolved} with the real Inception weights",
        "",
        f"`privbench gpu-check score` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}): {e.fid_samples} of the "
        f"{e.samples} samples against {e.fid_reference} test images of the carried CIFAR-10 subset (FID of so few is "
        f"biased upwards: compare only at these counts): {values}",
        "",
    ])


def append_scored(results_dir: Path, scored: str, log: Path) -> Path:
    """The device's perf.md section with the CPU's scores after it, appended to the perf log `log`."""
    from privbench.bench import append_report

    section = (results_dir / PERF).read_text() if (results_dir / PERF).is_file() else ""
    return append_report(log, section.rstrip("\n") + "\n\n" + scored)
