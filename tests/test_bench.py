"""`privbench bench`: rows for every stage and mode, failures reported, the perf log appended, the
projection's arithmetic. Timings are never asserted beyond being positive."""

import dataclasses

import pytest

from privbench.bench import (BenchOptions, Measurement, PaperWorkload, RowCosts, append_report, measure, paper_workload,
                             project, projection, render, report as bench_report, run_bench)
from privbench.cli import main
from privbench.dp import sgd
from privbench.dp.sgd import GRAD_SAMPLE_MODES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = dict(device="cpu", preset="smoke", batch=2, steps=1, warmup=0, progress=False)


@pytest.fixture(scope="module")
def report():
    return run_bench(BenchOptions(**TINY))


@pytest.fixture
def untimed(monkeypatch):
    """Every stage runs its steps as usual but reports 0.5 s each: for tests of which rows exist."""
    monkeypatch.setattr(measure, "_time_steps", lambda step, warmup, steps, *rest: [step() and 0.5 or 0.5 for _ in range(warmup + steps)][warmup:])


def test_every_stage_and_mode_is_measured(report):
    stages = [(m.stage, m.variant) for m in report.measurements]
    assert stages[0] == ("non-private step", "")
    assert [v for s, v in stages if s == "DP-SGD step"] == list(GRAD_SAMPLE_MODES)
    assert {"sampling", "Inception features", "CA classifier step"} <= {s for s, _ in stages}
    for m in report.measurements:
        assert m.ok, m.error
        assert len(m.times_s) == 1 and m.images_per_s > 0 and m.peak_memory_bytes > 0
    assert report.shape == (1, 28, 28)  # the smoke UNet is the MNIST one
    assert report.projection is None


def test_ratio_is_dp_time_over_non_private_time(report):
    plain = report.measurement("non-private step")
    for m in report.measurements:
        if m.stage == "DP-SGD step":
            assert m.ratio == pytest.approx(m.median_s / m.multiplicity / plain.median_s)


def test_a_failing_mode_is_reported_and_the_others_still_run(monkeypatch, untimed):
    real_wrap = sgd.wrap_for_dp

    def wrap(model, mode, clip_norm):
        if mode == "hooks":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsecond line")
        return real_wrap(model, mode, clip_norm)

    monkeypatch.setattr(sgd, "wrap_for_dp", wrap)
    result = run_bench(BenchOptions(**TINY, modes=("hooks", "functorch")))
    hooks = result.measurement("DP-SGD step", "hooks")
    assert hooks.error == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert hooks.ratio is None and hooks.times_s == ()
    assert result.measurement("DP-SGD step", "functorch").ok
    assert "failed: RuntimeError: CUDA out of memory" in render(result)


def test_ghost_is_not_run_at_multiplicity_above_one(untimed):
    result = run_bench(BenchOptions(**TINY, multiplicity=3))
    dp = [(m.variant, m.multiplicity) for m in result.measurements if m.stage == "DP-SGD step"]
    assert dp == [(mode, 1) for mode in GRAD_SAMPLE_MODES] + [("functorch", 3), ("hooks", 3), ("bookkeeping", 3)]


def test_append_keeps_the_log_and_adds_provenance(report, tmp_path):
    log = tmp_path / "perf.md"
    log.write_text("# existing log\n\nan earlier section\n")
    append_report(log, render(report))
    append_report(log, render(report))
    text = log.read_text()
    assert text.startswith("# existing log\n\nan earlier section\n")
    assert text.count("- command: `privbench bench --device cpu --preset smoke --batch 2 --steps 1 --warmup 0") == 2
    assert text.count("- device: cpu (") == 2 and text.count("- privbench commit: ") == 2
    versions = [line for line in text.splitlines() if line.startswith("- versions: python ")]
    assert len(versions) == 2 and all(", torch " in v and ", opacus " in v for v in versions)
    fresh = append_report(tmp_path / "new" / "perf.md", render(report)).read_text()
    assert fresh.startswith(bench_report.PERF_HEADER)


def test_projection_arithmetic():
    w = PaperWorkload(
        method="privimage", members=1000, epochs=10, logical_batch=100, multiplicity=4, grad_sample_mode="functorch",
        pretrain_steps=50, pretrain_batch=8, samples=200, sampler_steps=5, guidance=1.0,
        fid_samples=200, fid_reference=100, ca_classifiers=("a", "b"), ca_epochs=3,
    )
    # Seconds per row: DP 2 s / (10 images x K 2) = 0.1; plain 1 s / 10 = 0.1; sampler 9 s / (10 x 9 calls) = 0.1;
    # Inception 5 s / 10 = 0.5; classifiers 1 s / 10 and 2 s / 10.
    dp = Measurement("DP-SGD step", "functorch", images=10, multiplicity=2, times_s=(2.0,))
    costs = RowCosts(
        dp=dp,
        plain=Measurement("non-private step", images=10, times_s=(1.0, 1.0, 3.0)),
        sampler=Measurement("sampling", images=10, calls=9, times_s=(9.0,)),
        inception=Measurement("Inception features", images=10, times_s=(5.0,)),
        classifiers={"a": Measurement("CA classifier step", "a", images=10, times_s=(1.0,)),
                     "b": Measurement("CA classifier step", "b", images=10, times_s=(2.0,))},
    )
    stages = {p.stage: p for p in project(w, costs)}
    assert w.dp_steps == 100  # round(10 epochs / q), q = 100 / 1000
    assert stages["DP-SGD fine-tuning"].seconds == pytest.approx(100 * 100 * 4 * 0.1)
    assert stages["pre-training"].seconds == pytest.approx(50 * 8 * 0.1)
    assert stages["sampling"].seconds == pytest.approx(200 * 9 * 0.1)  # 2 * 5 - 1 calls per image
    assert stages["FID features"].seconds == pytest.approx(300 * 0.5)
    assert stages["CA training"].seconds == pytest.approx(3 * 200 * (0.1 + 0.2))
    assert stages["pre-training"].published_hours == projection.DPIMAGEBENCH_HOURS["privimage"]["pre-training"]
    # A method that trains from scratch has no pre-training stage; one without published hours, no published column.
    scratch = project(dataclasses.replace(w, method="dpdm", pretrain_steps=0, pretrain_batch=0), costs)
    assert "pre-training" not in {p.stage for p in scratch} and all(p.published_hours is None for p in scratch)
    missing = project(w, dataclasses.replace(costs, dp=None, classifiers={"a": None}))
    assert [p.seconds for p in missing if p.stage in ("DP-SGD fine-tuning", "CA training")] == [None, None]


def test_paper_workload_follows_the_presets():
    w = paper_workload("privimage")
    assert w.members == 22_500  # 50,000 CIFAR-10 images minus 10% validation, halved into members and non-members
    assert (w.logical_batch, w.epochs, w.multiplicity, w.sampler_steps, w.samples) == (4096, 150, 32, 250, 60_000)
    assert w.dp_steps == round(150 / (4096 / 22_500))
    assert w.pretrain_rows == 198_400 * 1024  # 3,200 epochs of the ~64,058 selected ImageNet-32 images
    assert paper_workload("pdp-diffusion").pretrain_rows == 200_160 * 1024  # 160 epochs of ImageNet-32
    assert paper_workload("dpdm").pretrain_steps == 0


def test_dp_rows_time_the_engines_own_steps(monkeypatch, untimed):
    steps = []
    real_step = sgd.DPSGDPhase.step
    monkeypatch.setattr(sgd.DPSGDPhase, "step", lambda phase, *a: steps.append(phase.mechanism) or real_step(phase, *a))
    result = run_bench(BenchOptions(**TINY, modes=("functorch", "bookkeeping")))
    assert [m.variant for m in result.measurements if m.stage == "DP-SGD step"] == ["functorch", "bookkeeping"]
    # One step per timed step of each mode, each charged to a calibrated mechanism with noise.
    assert len(steps) == 2 and all(m.noise_multiplier > 0 and m.steps == 1 for m in steps)


def test_bench_refuses_a_method_without_the_diffusion_unet(capsys):
    assert main(["bench", "--device", "cpu", "--preset", "smoke", "--method", "dp-merf", "--no-append"]) == 2
    err = capsys.readouterr().err
    assert "dp-merf" in err and "privimage" in err and len(err.strip().splitlines()) == 1


def test_cli_prints_the_table(capsys, tmp_path, untimed):
    log = tmp_path / "perf.md"
    args = ["bench", "--device", "cpu", "--preset", "smoke", "--batch", "2", "--steps", "1", "--warmup", "0",
            "--modes", "functorch"]
    assert main([*args, "--append", str(log)]) == 0
    out = capsys.readouterr().out
    assert "| non-private step" in out and "| DP-SGD step" in out and "functorch" in out
    assert f"appended to {log}" in out and "| DP-SGD step" in log.read_text()
    assert main([*args, "--modes", "nope", "--no-append"]) == 2
    assert "unknown grad-sample mode" in capsys.readouterr().err


def test_the_cpu_preset_is_benched_at_its_own_resolution(untimed):
    assert run_bench(BenchOptions(**{**TINY, "preset": "cpu"})).shape == (1, 16, 16)
