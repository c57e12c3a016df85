"""`privbench gpu-check`: its dry run (every step at tiny sizes on the CPU) leaves the log, the perf
section with each step's numbers and the end-to-end samples, which `score` then scores; a step that
fails, overruns or cannot be read is recorded with its traceback while the others run; the FID
network's stand-in is that network with random weights; the device-sized plan resolves; bad input is
refused in one line before any work."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privbench import gpu_check
from privbench.bench.measure import BenchOptions, resolve_options
from privbench.cli import main, parser
from privbench.config import parse_overrides, resolve
from privbench.data.cifar import CLASSES
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.metrics import inception

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]


def image_folder_zip(path: Path, splits: dict[str, int], classes: list[str], side: int, seed: int) -> Path:
    """A development copy's layout, `<split>/<class>/<file>.jpg`, of random JPEG images."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as z:
        for split, n in splits.items():
            for c in classes:
                for i in range(n):
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG")
                    z.writestr(f"{split}/{c}/{i:04d}.jpg", buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def carried(tmp_path_factory) -> Path:
    """A carried folder prepared from small stand-ins of the development copies (12 + 4 CIFAR-10 images
    per class, 6 of each of 12 Tiny-ImageNet classes, the test split's first images by file name)."""
    root = tmp_path_factory.mktemp("sources")
    cifar = image_folder_zip(root / "cifar.zip", {"train": 12, "test": 4}, list(CLASSES), 32, 0)
    tiny = image_folder_zip(root / "tiny.zip", {"train": 6}, [f"n{i:08d}" for i in range(12)], 64, 1)
    folder = root / "carried"
    assert main(["gpu-check", "prepare", "--cifar10", str(cifar), "--tiny-imagenet", str(tiny), "--carried", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def dry_run(carried, tmp_path_factory) -> tuple[int, Path]:
    """The dry run's exit code and output folder (run from the checkout, as on the device)."""
    out = tmp_path_factory.mktemp("out")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = main(["gpu-check", "run", "--dry-run", "--carried", str(carried), "--out", str(out)])
    finally:
        os.chdir(cwd)
    return code, out


def test_prepare_copies_the_subsets_unchanged(carried):
    manifest = json.loads((carried / gpu_check.MANIFEST).read_text())
    assert manifest["cifar10"]["images"] == {"train": 120, "test": 40}
    assert manifest["tiny-imagenet"]["images"] == {"train": 72}
    with zipfile.ZipFile(carried / gpu_check.CIFAR10) as z, zipfile.ZipFile(Path(manifest["cifar10"]["source"])) as source:
        assert sorted(z.namelist()) == sorted(source.namelist())
        assert all(z.read(name) == source.read(name) for name in z.namelist())


def test_the_dry_run_reports_every_step_with_its_numbers(dry_run):
    code, out = dry_run
    results = json.loads((out / gpu_check.RESULTS).read_text())
    assert [(s["name"], s["status"]) for s in results["steps"]] == [("tests", "passed"), ("bench", "passed"), ("e2e", "passed")], \
        (out / gpu_check.LOG).read_text()[-3000:]
    assert code == 0
    steps = {s["name"]: s for s in results["steps"]}
    assert steps["tests"]["summary"].startswith("6 passed")
    bench = steps["bench"]["numbers"]
    assert set(bench["ratios"]) == {"functorch", "bookkeeping"} and all(r > 0 for r in bench["ratios"].values())
    assert bench["best_mode"] == min(bench["ratios"], key=bench["ratios"].get)
    assert bench["inception_50k_s"] == pytest.approx(50_000 / bench["inception_images_per_s"])
    e2e = steps["e2e"]["numbers"]
    assert 0 <= e2e["ca"] <= 1 and 0 < e2e["epsilon"] <= 10
    assert {"query-classifier", "pretrain", "sample", "ca", "audit"} <= set(e2e["stages_s"]) and "fid" not in e2e["stages_s"]

    perf = (out / gpu_check.PERF).read_text()
    assert perf.startswith("## ") and "dry run" in perf
    for name in ("tests", "bench", "e2e"):
        assert f"| {name} | passed |" in perf and f"### {name}" in perf
    assert "| DP-SGD step" in perf and "random weights of the FID network" in perf and "CA " in perf
    log = (out / gpu_check.LOG).read_text()
    assert all(f"===== {name}: passed" in log for name in ("tests", "bench", "e2e"))

    with np.load(out / gpu_check.E2E / "samples.npz") as samples:
        assert samples["images"].shape == (24, 32, 32, 3) and samples["images"].dtype == np.uint8
        assert len(samples["labels"]) == 24
    assert sorted(p.name for p in (out / gpu_check.E2E).iterdir()) == sorted(gpu_check.E2E_FILES)


def test_score_computes_fid_of_the_returned_samples(dry_run, carried, tmp_path, capsys):
    _, out = dry_run
    log = tmp_path / "perf.md"
    args = ["gpu-check", "score", str(out), "--carried", str(carried), "--device", "cpu", "--quiet"]
    assert main([*args, "--append", str(log)]) == 0
    printed = capsys.readouterr().out
    fid = float(printed.split("fid ")[1].split(",")[0])
    assert np.isfinite(fid) and fid > 0
    text = log.read_text()
    assert "gpu-check on cpu" in text and "| e2e | passed |" in text
    assert text.index("| e2e | passed |") < text.index("### e2e: fidelity of the returned samples") < text.index(f"fid {fid:.4g}")


def test_a_failing_step_is_recorded_with_its_traceback_and_the_others_run(tmp_path):
    steps = [
        gpu_check.Step("boom", (sys.executable, "-c", "raise RuntimeError('boom')"), 60),
        gpu_check.Step("hangs", (sys.executable, "-c", "import time; time.sleep(120)"), 2),
        gpu_check.Step("fine", (sys.executable, "-c", "print('fine')"), 60),
        gpu_check.Step("unreadable", (sys.executable, "-c", "print('numbers')"), 60),
    ]

    def unreadable(result, work):
        raise KeyError("no such number")

    with open(tmp_path / "log", "w") as log:
        results = gpu_check.run_steps(steps, tmp_path, log, budget_s=600, reporters={"unreadable": unreadable})
    assert [r.status for r in results] == ["failed", "timed out", "passed", "failed"]
    assert "Traceback" in results[0].error and "RuntimeError: boom" in results[0].error
    assert results[1].seconds < 60 and "killed after its budget of 2 s" in results[1].summary
    assert "KeyError: 'no such number'" in results[3].error and "Traceback" in results[3].error
    assert "fine" in (tmp_path / "log").read_text()

    env = {"device": "cpu", "device_name": "a CPU", "python": "3", "torch": "2"}
    manifest = {"commit": "abc", "cifar10": {"images": {"train": 1}}, "tiny-imagenet": {"images": {"train": 1}}}
    perf = gpu_check.render(results, env, manifest, True, 600, 10, datetime(2026, 1, 1))
    assert "| boom | failed |" in perf and "| hangs | timed out |" in perf and "| fine | passed |" in perf
    assert "RuntimeError: boom" in perf and "KeyError: 'no such number'" in perf

    with open(tmp_path / "log", "w") as log:
        spent = gpu_check.run_steps(steps[2:3], tmp_path, log, budget_s=0)
    assert spent[0].status == "skipped" and "budget was spent" in spent[0].summary


def test_the_stand_in_is_the_fid_network_with_random_weights(carried, monkeypatch):
    path = carried / gpu_check.STAND_IN
    assert path.stat().st_size < 1_000_000  # the real weights are 87 MB
    stand_in, real = inception.load_stand_in(path), inception.load_inception()
    real_tensors = dict(real.named_parameters())
    tensors = dict(stand_in.named_parameters())
    assert tensors.keys() == real_tensors.keys()
    for name, tensor in tensors.items():
        reference = real_tensors[name]
        assert tensor.shape == reference.shape and not torch.equal(tensor, reference)
        if (reference > 0).all():  # batch-norm variances stay positive
            assert (tensor > 0).all(), name
        if reference.numel() > 1000:
            assert tensor.std().item() == pytest.approx(reference.std().item(), rel=0.1), name
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = inception.network_outputs(stand_in, images, progress=False)
    assert features.shape == (2, inception.FEATURE_DIM) and np.isfinite(features).all()
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    with pytest.raises(PrivbenchError, match="not the expected file"):
        inception.load_inception()  # a score never uses the stand-in


def test_the_device_sized_plan_resolves(carried, tmp_path):
    """What the device runs is valid before device time is spent on it: the run's settings resolve and
    validate, the bench's options resolve, and every selected test exists."""
    steps = {s.name: s for s in gpu_check.plan(gpu_check.settings()["full"], "cuda", carried, tmp_path)}
    cli_args = lambda step: parser().parse_args(step.argv[step.argv.index("privbench.cli") + 1:])  # noqa: E731
    run = cli_args(steps["e2e"])
    config = resolve(METHODS.get(run.method), run.dataset, float(run.eps), int(run.seed), run.preset, run.device,
                     parse_overrides(run.set))
    assert (config.preset, config.compute.precision, config.params.dp.grad_sample_mode) == ("small", "bf16", "bookkeeping")
    assert config.data.path == str((carried / gpu_check.CIFAR10).resolve())
    bench = cli_args(steps["bench"])
    options = resolve_options(BenchOptions(device=bench.device, preset=bench.preset, steps=bench.steps, warmup=bench.warmup,
                                           inception_stand_in=bench.inception_stand_in))
    assert (options.preset, options.batch, options.precision) == ("paper", 256, "bf16")
    for selected in steps["tests"].argv[steps["tests"].argv.index("no:cacheprovider") + 1:]:
        file, _, name = selected.partition("::")
        assert (REPO / file).is_file() and (not name or f"def {name}(" in (REPO / file).read_text()), selected
    assert dict(steps["tests"].env) == {gpu_check.TEST_DEVICE: "cuda"}


def test_bad_input_is_refused_before_any_work(carried, tmp_path, capsys):
    out = tmp_path / "out"
    refused = [
        (["gpu-check", "run", "--device", "tpu", "--carried", str(carried), "--out", str(out)], "unknown device 'tpu'"),
        (["gpu-check", "run", "--dry-run", "--carried", str(tmp_path / "none"), "--out", str(out)], "scripts/gpu-check prepare"),
        (["gpu-check", "score", str(tmp_path), "--carried", str(carried)], "lacks config.yaml, samples.npz"),
        (["gpu-check", "prepare", "--cifar10", str(tmp_path / "no.zip"), "--carried", str(tmp_path / "c")], "--cifar10"),
    ]
    for args, says in refused:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "c").exists()
