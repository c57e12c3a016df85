"""Boards built from several results databases and committed cells, and the sentences generated on them."""

import math

import pandas as pd
import pytest
from PIL import Image

from privbench import cli
from privbench.report.findings import paper_ordering, privacy_price
from privbench.report.sources import costs_path, gather
from privbench.store import Store

COST = {"name": "dp-train", "wall_s": 12.0, "device_s": 20.0, "peak_host_bytes": 2**30, "peak_device_bytes": None,
        "params": 1000, "device_name": "cpu", "reused": 0}


def _run(store, method, eps, seed, ca, fid, preset="cpu", dataset="mnist"):
    run_id = f"{method}_{dataset}_eps{eps:g}_seed{seed}_{preset}_h{method[:4]}{eps:g}"
    run_dir = store.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 30), (seed * 60, 100, 200)).save(run_dir / "samples.png")
    store.record({
        "run_id": run_id, "method": method, "dataset": dataset, "preset": preset, "seed": seed, "target_epsilon": eps,
        "epsilon": eps if math.isinf(eps) else 0.99 * eps, "delta": 1e-5, "accountant": "prv",
        "config_hash": f"h{method[:4]}{eps:g}", "config": "{}", "commit_id": f"c{seed}", "device": "cpu",
        "finished": "2026-01-01T00:00:00+00:00", "run_dir": str(run_dir),
    }, {"ca": (ca, {}), "fid": (fid, {}), "mia_tpr@0.1": (0.1, {}), "mia_tpr@0.1_low": (0.05, {}),
        "mia_tpr@0.1_high": (0.15, {}), "eps_lb": (0.0, {})}, [COST])
    return run_id


@pytest.fixture()
def two_machines(tmp_path):
    """Seed 0 ran on one machine, seed 1 on another; both ran dp-merf eps 1 seed 0 (the same run id)."""
    first, second = Store(tmp_path / "first"), Store(tmp_path / "second")
    for eps, ca in ((1.0, 0.30), (10.0, 0.60), (math.inf, 0.90)):
        _run(first, "dp-merf", eps, 0, ca, 100 / ca)
        _run(second, "dp-merf", eps, 1, ca + 0.02, 100 / ca + 1)
    _run(second, "dp-merf", 1.0, 0, 0.99, 1.0)  # a duplicate: the first source wins
    _run(second, "dp-merf", 10.0, 0, 0.5, 50.0, preset="smoke")
    return first, second


def test_table_merges_two_databases_each_run_once(two_machines, tmp_path, capsys):
    first, second = two_machines
    board = gather([first.root, second.root], [])
    assert len(board.runs) == 7 and board.runs["run_id"].is_unique
    duplicate = board.runs[(board.runs["seed"] == 0) & (board.runs["target_epsilon"] == 1.0)]
    assert duplicate["ca"].tolist() == [0.30]
    assert cli.main(["table", "--out", str(first.root), "--out", str(second.root), "--preset", "cpu"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| dp-merf "))
    assert "| cpu " in row and "|       2 |" in row  # two seeds, one per machine
    assert "smoke" not in row and "31.0 ± 1.4" in row  # eps 1: mean and std of 0.30 and 0.32


def test_committed_cells_rebuild_the_same_board_and_extend_it(two_machines, tmp_path, capsys):
    first, second = two_machines
    cells = tmp_path / "board" / "mnist.csv"
    assert cli.main(["table", "--out", str(first.root), "--preset", "cpu", "--format", "csv", "--output", str(cells)]) == 0
    assert costs_path(cells).is_file() and len(list((cells.parent / "grids").glob("*.png"))) == 3
    assert cli.main(["table", "--out", str(first.root), "--preset", "cpu"]) == 0
    from_db = capsys.readouterr().out
    assert cli.main(["table", "--cells", str(cells)]) == 0
    from_cells = capsys.readouterr().out
    strip = lambda text: [line for line in text.splitlines() if "generated" not in line]  # noqa: E731
    assert strip(from_cells) == strip(from_db)  # the leaderboard, the findings and the cost table
    # a second session adds its runs to the committed ones
    assert cli.main(["table", "--out", str(second.root), "--cells", str(cells), "--preset", "cpu", "--format", "csv",
                     "--output", str(cells)]) == 0
    merged = pd.read_csv(cells)
    assert sorted(merged["seed"]) == [0, 0, 0, 1, 1, 1]
    assert merged.loc[(merged["seed"] == 0) & (merged["target_epsilon"] == 1.0), "ca"].tolist() == [0.99]
    assert set(pd.read_csv(costs_path(cells))["run_id"]) == set(merged["run_id"])
    assert cli.main(["table", "--cells", str(cells), "--plots", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "samples_mnist.png").is_file()


def test_a_board_keeps_one_methods_cells_while_the_others_are_rerun(tmp_path, capsys):
    old, new = Store(tmp_path / "old"), Store(tmp_path / "new")
    for seed in (0, 1):
        _run(old, "dp-merf", 10.0, seed, 0.5, 100.0)
        _run(old, "dpdm", 10.0, seed, 0.1, 300.0)  # stale: re-run below under a new configuration
        _run(new, "dpdm", 10.0, seed, 0.2, 250.0)
    cells = tmp_path / "board" / "mnist.csv"
    assert cli.main(["table", "--out", str(old.root), "--format", "csv", "--output", str(cells)]) == 0
    kept = tmp_path / "kept" / "mnist.csv"
    assert cli.main(["table", "--cells", str(cells), "--method", "dp-merf", "--format", "csv", "--output", str(kept)]) == 0
    assert set(pd.read_csv(kept)["method"]) == {"dp-merf"} and set(pd.read_csv(costs_path(kept))["run_id"]) <= set(
        pd.read_csv(kept)["run_id"])
    assert cli.main(["table", "--out", str(new.root), "--cells", str(kept), "--format", "csv", "--output", str(cells)]) == 0
    board = pd.read_csv(cells)
    assert sorted(board["method"]) == ["dp-merf", "dp-merf", "dpdm", "dpdm"]
    assert board.loc[board["method"] == "dpdm", "ca"].tolist() == [0.2, 0.2]
    assert cli.main(["table", "--cells", str(cells), "--method", "dp-kernel"]) == 2
    assert "no finished runs of method dp-kernel: the sources hold dp-merf, dpdm" in capsys.readouterr().err


def test_bad_sources_are_one_line_errors(two_machines, tmp_path, capsys):
    first, _ = two_machines
    assert cli.main(["table", "--out", str(first.root), "--preset", "paper"]) == 2
    assert "no finished runs of preset paper: the sources hold cpu" in capsys.readouterr().err
    assert cli.main(["table", "--out", str(tmp_path / "nowhere")]) == 2
    assert "no results database" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("method,ca\nx,1\n")
    assert cli.main(["table", "--cells", str(bad)]) == 2
    assert "lacks the column(s)" in capsys.readouterr().err


def _board(values: dict) -> pd.DataFrame:
    """values: method -> eps -> list of (ca, fid), one per seed."""
    rows = [{"method": m, "preset": "cpu", "target_epsilon": e, "seed": s, "ca": ca, "fid": fid}
            for m, by_eps in values.items() for e, seeds in by_eps.items() for s, (ca, fid) in enumerate(seeds)]
    return pd.DataFrame(rows)


def test_privacy_price_states_order_and_spread():
    runs = _board({"dpdm": {1.0: [(0.10, 300), (0.12, 320)], 10.0: [(0.11, 250), (0.13, 260)],
                            math.inf: [(0.90, 20), (0.92, 22)]}})
    ca, fid = privacy_price(runs)[0], privacy_price(runs)[1]
    assert ca.startswith("dpdm (cpu), CA %: ε=inf 91.0 ± 1.4, ε=10 12.0 ± 1.4, ε=1 11.0 ± 1.4; ordered by the budget")
    assert "ε=inf ahead of ε=10 by 79.0 (spread 2.8)" in ca
    assert "ε=10 ahead of ε=1 by 1.0, within the seeds' spread 2.8" in ca
    assert "FID" in fid and "ordered by the budget" in fid and "ε=10 ahead of ε=1 by 55.0 (spread 21.2)" in fid


def test_privacy_price_flags_a_budget_that_does_not_pay():
    runs = _board({"pdp-diffusion": {1.0: [(0.5, 100)], 10.0: [(0.4, 120)]}})
    ca, fid = privacy_price(runs)
    assert "NOT ordered by the budget (ε=10 vs ε=1)" in ca and "(one seed: spread unknown)" in ca
    assert "NOT ordered by the budget" in fid


def test_paper_ordering_holds_or_names_the_break():
    runs = _board({"privimage": {1.0: [(0.6, 50), (0.62, 52)]}, "pdp-diffusion": {1.0: [(0.5, 60), (0.52, 70)]},
                   "dpdm": {1.0: [(0.55, 90), (0.57, 95)]}})
    ca, fid = paper_ordering(runs)
    assert ca.startswith("CA % at ε=1 (cpu): the paper's ordering privimage > pdp-diffusion > dpdm does NOT hold")
    assert "pdp-diffusion behind dpdm by 5.0" in ca
    assert "FID at ε=1 (cpu): the paper's ordering privimage > pdp-diffusion > dpdm holds" in fid
    assert paper_ordering(runs[runs["method"] != "dpdm"]) == []  # no claim without every method


def test_run_and_sweep_skip_the_cells_a_board_already_has(tmp_path, capsys):
    from privbench.config import resolve
    from privbench.methods import METHODS

    have = resolve(METHODS.get("dp-merf"), "mnist", 10.0, 0, "smoke", "cpu", {})
    cells = tmp_path / "board.csv"
    pd.DataFrame([{"dataset": "mnist", "method": "dp-merf", "preset": "smoke", "seed": 0, "target_epsilon": 10.0,
                   "config_hash": have.digest(), **{k: 0.5 for k in ("epsilon", "fid", "precision", "recall", "ca", "ca_std",
                                                                    "ca_noisy", "ca_oracle", "mia_tpr@0.1", "eps_lb")}}]
                 ).to_csv(cells, index=False)
    out = tmp_path / "runs"
    assert cli.main(["run", "--method", "dp-merf", "--eps", "10", "--device", "cpu", "--out", str(out), "--cells", str(cells)]) == 0
    assert f"skipped {have.run_id}: already in {cells}" in capsys.readouterr().out
    assert not out.exists()
    assert cli.main(["sweep", "--method", "dp-merf", "--eps", "1,10", "--device", "cpu", "--out", str(out), "--dry-run",
                     "--cells", str(cells)]) == 0
    text = capsys.readouterr().out
    assert f"skipped {have.run_id}" in text and "dp-merf_mnist_eps1_seed0_smoke" in text


def test_grids_are_found_when_the_runs_were_made_from_another_directory(tmp_path, monkeypatch):
    # `privbench run --out runs` stores run_dir relative to where it started; a board made from
    # elsewhere still finds every grid, through the store's own root.
    monkeypatch.chdir(tmp_path)
    store = Store("runs")
    run_id = _run(store, "dp-merf", 10.0, 0, 0.5, 50.0)
    monkeypatch.chdir(tmp_path / "runs" / "runs")
    cells = tmp_path / "board" / "mnist.csv"
    assert cli.main(["table", "--out", str(tmp_path / "runs"), "--format", "csv", "--output", str(cells)]) == 0
    assert (cells.parent / "grids" / f"{run_id}.png").is_file()
