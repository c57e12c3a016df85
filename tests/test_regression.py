"""`privbench check --against`: a committed leaderboard CSV against a database, with readable diffs."""

import math

import pytest

from privbench import cli
from privbench.errors import PrivbenchError
from privbench.metrics import names
from privbench.report import render
from privbench.report.regression import TOLERANCES, parse_tolerances
from privbench.store import Store

METRICS = {"fid": 120.0, "precision": 0.5, "recall": 0.4, "ca": 0.3, "ca_std": 0.02, "ca_noisy": 0.29,
           "ca_oracle": 0.33, "mia_tpr@0.1": 0.11, "eps_lb": 0.01}


@pytest.fixture
def leaderboard(tmp_path, record_run):
    """A database of three runs and the CSV `privbench table --format csv` makes of it."""
    store = Store(tmp_path / "runs")
    for method, eps in (("dp-merf", 1.0), ("dp-merf", 10.0), ("dpdm", 1.0)):
        record_run(store, method, eps, 0, METRICS)
    path = tmp_path / "smoke.csv"
    path.write_text(render(store.runs(), "csv"))
    return store, path, record_run


def check(store, path, *extra):
    return cli.main(["check", "--out", str(store.root), "--against", str(path), *extra])


def test_the_database_a_leaderboard_was_made_from_passes(leaderboard, capsys):
    store, path, _ = leaderboard
    assert check(store, path) == 0
    assert "3 cells, 30 of 30 numbers within tolerance, 0 not" in capsys.readouterr().out


def test_full_precision_survives_the_csv(leaderboard, capsys, record_run):
    store, path, _ = leaderboard
    record_run(store, "dp-merf", 1.0, 0, METRICS | {"fid": 120.0 + 1e-12})
    assert check(store, path, "--tolerance", "fid=0") == 1  # a 1e-12 change is still seen
    assert check(store, path, "--tolerance", "fid=1e-9") == 0


def test_a_moved_metric_fails_with_a_diff_naming_the_cell(leaderboard, capsys, record_run):
    store, path, _ = leaderboard
    record_run(store, "dp-merf", 10.0, 0, METRICS | {"fid": 125.0, "ca": 0.305})
    assert check(store, path) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "fid" in line and "dp-merf" in line)
    assert "dp-merf cifar10 eps=10 seed=0 (smoke)" in line and "120" in line and "125" in line and "moved beyond" in line
    assert out.count("moved beyond") == 1  # CA's 0.005 is within its tolerance of 0.01
    assert "1 not" in out
    assert check(store, path, "--tolerance", "fid=6") == 0


def test_a_changed_composed_epsilon_fails_even_when_tiny(leaderboard, capsys, record_run):
    store, path, _ = leaderboard
    record_run(store, "dpdm", 1.0, 0, METRICS, epsilon=0.99 * (1 + 1e-4))
    assert check(store, path) == 1
    assert "THE COMPOSED EPSILON CHANGED" in capsys.readouterr().out


def test_a_changed_configuration_and_a_missing_run_fail(leaderboard, capsys, record_run):
    store, path, _ = leaderboard
    record_run(store, "dpdm", 1.0, 0, METRICS, config_hash="other")
    with Store(store.root)._connect() as db:
        db.execute("DELETE FROM metrics WHERE run_id = 'dp-merf-eps10-seed0'")
        db.execute("DELETE FROM runs WHERE run_id = 'dp-merf-eps10-seed0'")
    assert check(store, path) == 1
    out = capsys.readouterr().out
    assert "the configuration changed" in out and "not in the database" in out


def test_cells_can_be_selected_and_bad_input_is_a_one_line_error(leaderboard, capsys):
    store, path, _ = leaderboard
    assert check(store, path, "--method", "dpdm") == 0
    assert "1 cells" in capsys.readouterr().out
    assert check(store, path, "--method", "dp-merf", "--eps", "10") == 0
    assert check(store, path, "--eps", "5") == 2
    assert check(store, store.root / "missing.csv") == 2
    err = capsys.readouterr().err
    assert "no cell of" in err and "no leaderboard CSV at" in err
    with pytest.raises(PrivbenchError, match="unknown metric 'fdi'"):
        parse_tolerances("fdi=1")
    with pytest.raises(PrivbenchError, match="is negative"):
        parse_tolerances("fid=-1")
    assert parse_tolerances("fid=0.5")["fid"] == 0.5 and parse_tolerances(None) == TOLERANCES


def test_infinite_epsilon_and_missing_audit_compare_as_equal(tmp_path, record_run, capsys):
    store = Store(tmp_path / "runs")
    record_run(store, "dpdm", math.inf, 0, {k: v for k, v in METRICS.items() if not names.is_audit_metric(k)})
    path = tmp_path / "inf.csv"
    path.write_text(render(store.runs(), "csv"))
    assert check(store, path) == 0


def test_a_board_carries_its_measured_tolerances(leaderboard, capsys, record_run):
    store, path, _ = leaderboard
    record_run(store, "dp-merf", 10.0, 0, METRICS | {"ca": 0.35})  # moved by 0.05: beyond the default 0.01
    assert check(store, path) == 1
    tolerances = path.with_name("smoke-tolerances.yaml")
    tolerances.write_text("# measured: ...\nca: 0.06\n")
    capsys.readouterr()
    assert check(store, path) == 0
    assert check(store, path, "--tolerance", "ca=0.04") == 1  # the command line has the last word
    for text, complaint in (("ca: [1\n", "not valid YAML"), ("cca: 0.1\n", "unknown: cca"), ("ca: -1\n", "must be a number >= 0")):
        tolerances.write_text(text)
        capsys.readouterr()
        assert check(store, path) == 2
        assert complaint in capsys.readouterr().err


@pytest.mark.slow
def test_ci_check_fails_on_a_planted_regression(tmp_path, monkeypatch, capsys):
    """The CI cell re-run with half the DP-MERF training, its configuration (so its identity) unchanged:
    the board's measured tolerances, wide enough for other machines and torch versions, must not
    absorb a real regression (about 2.5 minutes on 2 cores, FID and CA dominate)."""
    import dataclasses
    from pathlib import Path

    from privbench.methods import dp_merf

    board = Path(__file__).parent.parent / "leaderboards" / "smoke" / "mnist.csv"
    fit = dp_merf.DPMERF.__init__
    monkeypatch.setattr(dp_merf.DPMERF, "__init__",
                        lambda self, config: fit(self, dataclasses.replace(config, epochs=config.epochs // 2)))
    assert cli.main(["check", "--against", str(board), "--method", "dp-merf", "--eps", "10", "--rerun", "--quiet",
                     "--device", "cpu", "--out", str(tmp_path)]) == 1
    moved = {line.split()[5] for line in capsys.readouterr().out.splitlines() if "moved beyond tolerance" in line}
    assert moved & {"fid", "ca"}, moved


def test_the_audit_metric_names_stay_those_the_committed_boards_and_databases_hold():
    assert (names.attack_tpr("pia"), names.attack_eps_lb("pia")) == ("mia/pia/tpr@0.1", "mia/pia/eps_lb")
    assert (names.TPR, names.TPR_LOW, names.TPR_HIGH, names.EPS_LB) == (
        "mia_tpr@0.1", "mia_tpr@0.1_low", "mia_tpr@0.1_high", "eps_lb")
    audit = [names.attack_tpr("pia"), names.attack_eps_lb("pia"), names.TPR, names.TPR_LOW, names.TPR_HIGH, names.EPS_LB]
    assert all(map(names.is_audit_metric, audit))
    assert not any(map(names.is_audit_metric, ["epsilon", "fid", "precision", "ca", "ca_noisy", "is"]))
    assert [n for n in audit if names.is_attack_tpr(n)] == ["mia/pia/tpr@0.1"]


def test_a_csv_written_before_later_scores_or_without_some_columns_still_checks(leaderboard, capsys):
    import pandas as pd

    store, path, _ = leaderboard
    old = pd.read_csv(path).drop(columns=["kid", "kid_std", "density", "coverage", "memorisation", "ca_oracle"])
    old.to_csv(path, index=False)
    assert check(store, path) == 0
    out = capsys.readouterr().out
    assert "3 cells, 27 of 27 numbers within tolerance, 0 not" in out
    assert "not compared (absent from" in out and "ca_oracle" in out and "kid" in out
    old.drop(columns=["epsilon"]).to_csv(path, index=False)
    assert check(store, path) == 2
    assert "lacks the column(s) epsilon" in capsys.readouterr().err


def test_a_later_score_is_compared_where_the_board_measured_its_tolerance(tmp_path, record_run, capsys):
    store = Store(tmp_path / "runs")
    record_run(store, "dp-merf", 10.0, 0, METRICS | {"kid": 0.05})
    path = tmp_path / "board.csv"
    path.write_text(render(store.runs(), "csv"))
    (tmp_path / "board-tolerances.yaml").write_text("kid: 0.01\n")
    record_run(store, "dp-merf", 10.0, 0, METRICS | {"kid": 0.08})
    assert check(store, path) == 1
    assert "kid" in next(line for line in capsys.readouterr().out.splitlines() if "moved beyond tolerance" in line)
