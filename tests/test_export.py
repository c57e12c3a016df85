"""`privbench export`: a finished run's synthetic copy with its PRIVACY.json, and every refusal."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from privbench import cli
from privbench.config import parse_overrides, resolve
from privbench.errors import PrivbenchError
from privbench.export import POST_PROCESSING, export
from privbench.harness import run
from privbench.methods import METHODS
from privbench.store import Store

TINY = ["params.d_rff=200", "params.epochs=1", "eval.samples=60", "eval.fid_samples=8", "eval.fid_reference=8",
        "eval.ca_epochs=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("runs"))
    config = resolve(METHODS.get("dp-merf"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(TINY))
    return store, run(config, store, progress=False, audit=False)


def test_export_writes_an_imagefolder_and_its_privacy_statement(finished, tmp_path, capsys):
    store, row = finished
    out = tmp_path / "copy"
    assert cli.main(["export", row["run_id"], "--n", "25", "--out", str(out), "--runs", str(store.root)]) == 0
    assert str(out) in capsys.readouterr().out
    pngs = sorted(out.glob("*/*.png"))
    assert len(pngs) == 25 and {p.parent.name for p in pngs} <= {str(d) for d in range(10)}
    assert {int(p.stem) for p in pngs} == set(range(25))
    assert np.asarray(Image.open(pngs[0])).shape == (28, 28)
    privacy = json.loads((out / "PRIVACY.json").read_text())
    ledger = json.loads((store.run_dir(row["run_id"]) / "ledger.json").read_text())
    assert privacy["epsilon"] == pytest.approx(row["epsilon"]) == pytest.approx(ledger["composed_epsilon"])
    assert privacy["delta"] == row["delta"] and privacy["accountant"] == row["accountant"]
    assert privacy["mechanisms"] == ledger["mechanisms"] and privacy["mechanisms"]
    assert privacy["randomness"] == "seeded" and "privacy.randomness=os" in privacy["randomness_note"]
    assert privacy["method"] == "dp-merf" and privacy["config_hash"] == row["config_hash"]
    assert privacy["commit"] == row["commit_id"] and privacy["sampling"] == POST_PROCESSING
    assert "no privacy budget" in privacy["sampling"]
    assert not list(tmp_path.glob(".copy.*"))  # no staging directory left behind


def test_export_as_npz_repeats_and_spends_nothing(finished, tmp_path):
    store, row = finished
    ledger = (store.run_dir(row["run_id"]) / "ledger.json").read_text()
    first = export(store, row["run_id"], 12, tmp_path / "a", "npz", "cpu")
    second = export(store, row["run_id"], 12, tmp_path / "b", "npz", "cpu")
    with np.load(first / "samples.npz") as a, np.load(second / "samples.npz") as b:
        assert a["images"].shape == (12, 28, 28, 1) and a["images"].dtype == np.uint8
        np.testing.assert_array_equal(a["images"], b["images"])
        assert list(a["classes"]) == [str(d) for d in range(10)]
    assert (store.run_dir(row["run_id"]) / "ledger.json").read_text() == ledger
    assert Store(store.root).runs().set_index("run_id").loc[row["run_id"], "epsilon"] == row["epsilon"]


def test_export_refuses_in_one_line_and_overwrites_nothing(finished, tmp_path, capsys):
    store, row = finished
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("stored data")
    runs = ["--runs", str(store.root)]
    cases = [
        (["export", "nope", "--n", "5", "--out", str(tmp_path / "x"), *runs], "no finished run 'nope'"),
        (["export", row["run_id"], "--n", "0", "--out", str(tmp_path / "x"), *runs], "--n must be a positive number"),
        (["export", row["run_id"], "--n", "5", "--out", str(kept), *runs], "is not an empty directory"),
        (["export", row["run_id"], "--n", "5", "--out", str(tmp_path / "x"), "--runs", str(tmp_path / "none")],
         "no results database"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert (kept / "mine.txt").read_text() == "stored data" and not (tmp_path / "x").exists()


def test_export_refuses_a_canary_run(finished, tmp_path, record_run):
    store, _ = finished
    config = resolve(METHODS.get("dp-gan"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["audit.canaries=8"]))
    run_id = record_run(store, "dp-gan", 1.0, 0, {})
    run_dir = store.run_dir(run_id)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=list))))
    with pytest.raises(PrivbenchError, match="is a canary run"):
        export(store, run_id, 5, tmp_path / "x")
    assert not (tmp_path / "x").exists()
