"""Runs end to end through the harness and the CLI: records, tables, skipping, resuming, bad input."""

import json
import math
import sqlite3
import subprocess

import numpy as np
import pytest
import yaml

from privbench import cli
from privbench.config import parse_overrides, resolve
from privbench.errors import PrivbenchError
from privbench.harness import run
from privbench.methods import METHODS
from privbench.report import render
from privbench.store import Store

DPMERF = METHODS.get("dp-merf")
# Small enough for seconds on a 2-core CPU, real in every stage.
TINY = [
    "params.d_rff=200", "params.epochs=1", "eval.samples=60", "eval.fid_samples=8", "eval.fid_reference=8",
    "eval.ca_epochs=1",
]


def tiny_config(epsilon=1.0, seed=0, extra=()):
    return resolve(DPMERF, "mnist", epsilon, seed, "smoke", "cpu", parse_overrides([*TINY, *extra]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run at eps 1 and one at eps 10, in one store."""
    store = Store(tmp_path_factory.mktemp("runs"))
    rows = [run(tiny_config(eps), store, progress=False) for eps in (1.0, 10.0)]
    return store, rows


def test_a_run_leaves_a_complete_run_directory(finished):
    store, rows = finished
    run_dir = store.run_dir(rows[0]["run_id"])
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "split.json", "ledger.json", "log.txt", "fit.pt", "samples.npz", "samples.png",
            "metrics.json", "costs.json"} <= names
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"] == "dp-merf" and config["params"]["d_rff"] == 200
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["composed_epsilon"] == pytest.approx(rows[0]["epsilon"])
    with np.load(run_dir / "samples.npz") as samples:
        assert samples["images"].shape == (60, 28, 28, 1)
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["members"]) == len(split["non_members"]) == 1800


def test_database_holds_the_composed_epsilon_and_metrics(finished):
    store, rows = finished
    for row, target in zip(rows, (1.0, 10.0)):
        assert row["target_epsilon"] == target
        assert 0.99 * target <= row["epsilon"] <= target * (1 + 1e-6)
        assert row["accountant"] == "prv"
        assert row["fid"] > 0 and 0 <= row["ca"] <= 1
    costs = store.costs()
    assert set(costs["stage"]) == {"fit", "sample", "fid", "ca", "audit"}
    assert (costs["wall_s"] > 0).all()
    per_stage = costs[costs["run_id"] == rows[0]["run_id"]].set_index("stage")["params"]
    assert per_stage["fit"] == per_stage["sample"] > 1000  # the generator's size
    assert per_stage["ca"] > 1000  # the CA classifier's


def test_table_shows_every_run_with_spent_epsilon(finished):
    store, _ = finished
    table = render(store.runs(), "md")
    assert "| dp-merf" in table
    assert "ε=1 FID" in table and "ε=10 CA %" in table and "ε=1 spent" in table
    assert "commit" in table
    csv = render(store.runs(), "csv")
    assert csv.splitlines()[0].startswith("dataset,method,preset,seed,target_epsilon,config_hash,epsilon,fid,")
    assert "\\toprule" in render(store.runs(), "latex")
    with_costs = render(store.runs(), "md", costs=store.costs())
    assert "cost per stage" in with_costs
    header = next(line for line in with_costs.splitlines() if line.startswith("| method") and "fit s" in line)
    assert [c.strip() for c in header.strip("|").split("|")][4:] == [
        "fit s", "sample s", "fid s", "ca s", "audit s", "DP-SGD % of fit", "total s", "peak host GiB", "generator params"]


def test_every_run_is_audited_and_can_be_reaudited(finished, capsys):
    store, rows = finished
    run_dir = store.run_dir(rows[0]["run_id"])
    audit = json.loads((run_dir / "audit.json").read_text())
    assert set(audit) == {"nearest"}  # DP-MERF exposes no model: only the black-box attack applies
    assert audit["nearest"]["settings"]["chosen"]["space"] == "pixel"  # smoke audits in pixel space
    assert "ε=1 TPR@10%FPR" in render(store.runs(), "md")
    before = store.runs().set_index("run_id").loc[rows[0]["run_id"], "mia_tpr@0.1"]
    assert cli.main(["audit", rows[0]["run_id"], "--attack", "nearest", "--out", str(store.root)]) == 0
    assert "nearest: TPR@10%FPR" in capsys.readouterr().out
    after = store.runs().set_index("run_id").loc[rows[0]["run_id"]]
    assert after["mia_tpr@0.1"] == before  # same seed, same attack: the same number
    assert list(store.costs().query(f"run_id == '{rows[0]['run_id']}'")["stage"]).count("audit") == 1
    # PIA requires a denoiser, which DP-MERF's synthesizer does not declare: refused in one line, nothing stored is lost.
    assert cli.main(["audit", rows[0]["run_id"], "--attack", "pia", "--out", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert "attack pia requires the capability denoiser, which method dp-merf's synthesizer" in err
    assert len(err.strip().splitlines()) == 1
    assert set(json.loads((run_dir / "audit.json").read_text())) == {"nearest"}
    assert store.runs().set_index("run_id").loc[rows[0]["run_id"], "mia_tpr@0.1"] == before


def test_a_run_reports_every_fidelity_score_and_ca_per_class(finished):
    store, rows = finished
    row = rows[0]
    stored = json.loads((store.run_dir(row["run_id"]) / "metrics.json").read_text())
    for name in ("kid", "kid_std", "density", "coverage", "memorisation", "memorisation_low", "memorisation_high"):
        assert math.isfinite(row[name]), name
    assert row["memorisation_low"] <= row["memorisation"] <= row["memorisation_high"]
    assert stored["memorisation"]["detail"]["members"] == stored["memorisation"]["detail"]["non_members"] == 8
    per_class_ca = {name: v["value"] for name, v in stored.items() if name.startswith("ca/")}
    assert set(per_class_ca) == {f"ca/{d}" for d in range(10)}
    # 8 samples over 10 classes: no class reaches FID's 500, so classes get KID where they have 2 images
    assert not any(name.startswith("fid/") for name in stored)
    assert all(v["detail"]["synthetic"] >= 2 for name, v in stored.items() if name.startswith("kid/"))


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_rescoring_computes_no_features_again_and_adds_fd_dinov2(finished, dinov2_stand_in, monkeypatch, capsys):
    from privbench.metrics import dinov2, frechet, inception

    store, rows = finished
    run_id = rows[1]["run_id"]
    before = store.runs().set_index("run_id").loc[run_id]
    fid_cost = store.costs().query(f"run_id == '{run_id}' and stage == 'fid'")["wall_s"].item()
    seen = []
    real_features = inception.inception_features
    monkeypatch.setattr(inception, "inception_features", lambda images, *a, **k: seen.append(len(images)) or real_features(images, *a, **k))
    monkeypatch.setenv(dinov2.WEIGHTS_ENV, str(dinov2_stand_in[1]))
    assert cli.main(["rescore", run_id, "--out", str(store.root), "--quiet"]) == 0
    assert run_id in capsys.readouterr().out
    assert seen == []  # every Inception feature came from the run's folder or the cache
    after = store.runs().set_index("run_id").loc[run_id]
    assert after["fid"] == before["fid"] and after["kid"] == before["kid"] and after["ca"] == before["ca"]
    # FD_DINOv2 is the Fréchet distance of the stand-in's features of the same images
    extractor = dinov2.extractor()
    config = yaml.safe_load((store.run_dir(run_id) / "config.yaml").read_text())
    with np.load(store.run_dir(run_id) / "samples.npz") as saved:
        synthetic = saved["images"][: config["eval"]["fid_samples"]]
    stored = json.loads((store.run_dir(run_id) / "metrics.json").read_text())
    reference = stored["fd_dinov2"]["detail"]["reference"]
    assert stored["fd_dinov2"]["detail"]["weights_sha1"] == extractor.weights_sha1 and reference == 8
    fake = extractor.compute(synthetic, "cpu", None, False).astype(np.float32)
    cached = [np.load(p)["features"] for p in (store.cache_dir / "fid-ref").glob(f"*-{extractor.weights_sha1[:12]}.npz")]
    assert [len(c) for c in cached] == [8]
    assert after["fd_dinov2"] == pytest.approx(frechet.fid_of_features(fake, cached[0]), rel=1e-6)
    costs = store.costs().query(f"run_id == '{run_id}'").set_index("stage")["wall_s"]
    assert set(costs.index) == {"fit", "sample", "fid", "ca", "audit", "rescore"} and costs["fid"] == fid_cost
    assert "ca/3" in stored and "mia_tpr@0.1" in stored  # what rescoring does not touch stays


def test_table_shows_the_metrics_asked_for(finished, capsys):
    store, _ = finished
    assert cli.main(["table", "--out", str(store.root), "--metrics", "kid,coverage,ca/3"]) == 0
    out = capsys.readouterr().out
    assert "ε=1 KID" in out and "ε=10 coverage" in out and "ε=1 CA % [3]" in out and "ε=1 FID" in out
    assert cli.main(["table", "--out", str(store.root), "--metrics", "ca/3", "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert {"kid", "density", "coverage", "memorisation", "memorisation_low", "ca/3"} <= set(header)
    assert cli.main(["table", "--out", str(store.root), "--metrics", "kdi"]) == 2
    err = capsys.readouterr().err
    assert "no run has the metric(s) kdi: choose from" in err and "kid" in err and len(err.strip().splitlines()) == 1


def test_check_fails_on_an_accounting_failure_and_keeps_the_database(tmp_path, capsys):
    store = Store(tmp_path)
    row = {"method": "m", "dataset": "d", "preset": "smoke", "seed": 0, "target_epsilon": 1.0, "delta": 1e-5,
           "accountant": "prv", "config_hash": "h", "config": "{}", "commit_id": None, "device": "cpu",
           "finished": "now", "run_dir": "r"}
    store.record({**row, "run_id": "honest", "epsilon": 0.99}, {"eps_lb": (0.4, {})}, [])
    assert cli.main(["check", "--out", str(tmp_path)]) == 0
    store.record({**row, "run_id": "planted", "epsilon": 0.99}, {"eps_lb": (1.7, {})}, [])
    assert cli.main(["check", "--out", str(tmp_path)]) == 1
    flagged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ACCOUNTING FAILURE")]
    assert len(flagged) == 1 and flagged[0].startswith("ACCOUNTING FAILURE planted")
    assert "(ε_lb > ε: accounting failure)" in render(store.runs(), "md")
    assert len(store.runs()) == 2


def test_a_finished_run_is_not_redone(finished, monkeypatch):
    store, rows = finished
    monkeypatch.setattr(DPMERF, "fit", lambda *a, **k: pytest.fail("a finished run was fitted again"))
    again = run(tiny_config(1.0), store, progress=False)
    assert again["run_id"] == rows[0]["run_id"] and again["fid"] == rows[0]["fid"]


def test_an_interrupted_run_resumes_without_spending_budget_again(tmp_path, monkeypatch):
    store = Store(tmp_path)
    config = tiny_config(2.0)
    import privbench.harness as harness

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "classification_accuracy", crash)
    with pytest.raises(KeyboardInterrupt):
        run(config, store, progress=False)
    assert not store.has(config.run_id)  # nothing half-written in the database
    fitted = json.loads((store.run_dir(config.run_id) / "ledger.json").read_text())

    monkeypatch.undo()
    monkeypatch.setattr(DPMERF, "fit", lambda *a, **k: pytest.fail("the resumed run fitted (and spent) again"))
    row = run(config, store, progress=False)
    assert row["epsilon"] == pytest.approx(fitted["composed_epsilon"])
    costs = store.costs()
    assert costs.set_index("stage").loc["fit", "reused"] == 1


def test_same_seed_same_result(finished, tmp_path):
    _, rows = finished
    again = run(tiny_config(1.0), Store(tmp_path), progress=False)
    assert (again["fid"], again["ca"], again["epsilon"]) == (rows[0]["fid"], rows[0]["ca"], rows[0]["epsilon"])


def test_a_killed_writer_leaves_the_database_readable(tmp_path):
    store = Store(tmp_path)
    row = {"run_id": "x", "method": "m", "dataset": "d", "preset": "smoke", "seed": 0, "target_epsilon": 1.0,
           "epsilon": 0.99, "delta": 1e-5, "accountant": "prv", "config_hash": "h", "config": "{}",
           "commit_id": None, "device": "cpu", "finished": "now", "run_dir": "r"}
    bad_cost = [{"name": "fit"}]  # missing fields: the insert fails half-way through the transaction
    with pytest.raises(sqlite3.ProgrammingError):
        store.record(row, {"fid": (1.0, {})}, bad_cost)
    assert not store.has("x") and store.runs().empty  # rolled back: no run row without its costs


def test_delta_must_be_below_one_over_members(tmp_path):
    with pytest.raises(PrivbenchError, match=r"delta 0.001 is not below 1/1800"):
        run(tiny_config(1.0, extra=["delta=1e-3"]), Store(tmp_path), progress=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--method", "dp-merff", "--eps", "1"], "unknown method 'dp-merff' (did you mean 'dp-merf'?)"),
        (["run", "--method", "dp-merf", "--eps", "0"], "epsilon must be > 0"),
        (["run", "--method", "dp-merf", "--eps=-1,2"], "epsilon must be > 0"),
        (["run", "--method", "dp-merf", "--eps", "one"], "not a comma-separated list"),
        (["run", "--method", "dp-merf", "--eps", "1", "--set", "delta=2"], "delta must lie in (0, 1)"),
        (["run", "--method", "dp-merf", "--eps", "1", "--set", "eval.sample=3"], "did you mean 'eval.samples'"),
        (["run", "--method", "dp-merf", "--eps", "1", "--dataset", "glyphs"], "glyphs is a public dataset"),
        (["run", "--method", "dp-merf", "--eps", "1", "--dataset", "cifar10", "--set", "data.path=/nonexistent"],
         "dataset 'cifar10' not found at /nonexistent"),
        (["run", "--method", "dp-merf", "--eps", "1", "--preset", "huge"], "unknown preset 'huge'"),
        (["table"], "no results database"),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path / "out")] if argv[0] != "table" else [*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("out/runs/*"))  # bad input is refused before a run directory exists


def test_cli_run_prints_the_table_and_table_reads_it_back(tmp_path, capsys):
    out = str(tmp_path / "out")
    sets = [a for item in TINY for a in ("--set", item)]
    assert cli.main(["run", "--method", "dp-merf", "--eps", "inf", "--out", out, "--quiet", *sets]) == 0
    printed = capsys.readouterr().out
    assert "| dp-merf" in printed and "ε=inf FID" in printed and "ε=inf spent" in printed
    assert cli.main(["table", "--out", out, "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and rows[1].startswith("mnist,dp-merf,smoke,0,inf,") and rows[1].endswith(",cpu")
    (no_privacy,) = Store(out).runs().to_dict("records")
    assert math.isinf(no_privacy["epsilon"]) and math.isinf(no_privacy["target_epsilon"])


def test_data_list_names_every_dataset(capsys):
    assert cli.main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("mnist", "glyphs", "cifar10", "celeba32", "celeba64", "ham10000", "dermamnist",
                 "imagenet32", "imagenet64", "tiny-imagenet"):
        assert name in listing


def test_provenance_commit_says_when_tracked_files_differ_from_it(tmp_path):
    from privbench.store import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    assert git_commit(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = git_commit(tmp_path)
    assert len(clean) == 12 and "+" not in clean
    (tmp_path / "notes.txt").write_text("untracked files do not change the code\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "+dirty"
