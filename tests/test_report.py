"""Published-number comparison, plots and `privbench table --paper/--plots`, on a store of fake runs."""

import io
import math
import re

import pandas as pd
import pytest
from PIL import Image

from privbench import cli
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.report.paper import PAPER_DIR, PAPERS, load_published, side_by_side
from privbench.report.plots import metric_vs_epsilon, sample_sheet, write_plots
from privbench.store import Store

# method -> seed -> (fid, ca fraction) at every epsilon; eps=inf only for privimage seed 0.
VALUES = {"privimage": {0: (10.0, 0.70), 1: (14.0, 0.74)}, "dp-merf": {0: (200.0, 0.25), 1: (220.0, 0.29)}}
NO_SAMPLES = {"dp-merf-eps10-seed0", "privimage-epsinf-seed0"}  # runs that left no samples.png


def _record(record_run, store, method, eps, seed, fid, ca):
    run_id = record_run(store, method, eps, seed, {"fid": fid, "ca": ca})
    if run_id not in NO_SAMPLES:
        Image.new("RGB", (40, 20), (40 * seed, 120, 200)).save(store.run_dir(run_id) / "samples.png")


@pytest.fixture(scope="module")
def store(tmp_path_factory, record_run):
    store = Store(tmp_path_factory.mktemp("runs"))
    for method, seeds in VALUES.items():
        for eps in (1.0, 10.0):
            for seed, (fid, ca) in seeds.items():
                _record(record_run, store, method, eps, seed, fid, ca)
    _record(record_run, store, "privimage", math.inf, 0, 5.0, 0.8)
    return store


def _cells(text):
    """The csv comparison as {(dataset, row label): {column: cell}}."""
    table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    return {(row["dataset"], row["method"]): row for row in table.to_dict("records")}


def test_side_by_side_puts_mean_std_over_seeds_next_to_the_published_number(store):
    cells = _cells(side_by_side(store.runs(), load_published("dpimagebench"), "csv"))
    privimage = cells[("cifar10", "privimage (smoke)")]
    assert privimage["ε=10 FID privbench"] == "12.0 ± 2.8" and privimage["ε=10 FID published"] == "13.1"
    assert privimage["ε=1 CA % privbench"] == "72.0 ± 2.8" and privimage["ε=1 CA % published"] == "74.5"
    assert privimage["ε=10 CA % published"] == "78.4"
    merf = cells[("cifar10", "dp-merf (smoke)")]
    assert merf["ε=10 FID privbench"] == "210.0 ± 14.1" and merf["ε=10 FID published"] == "214.1"
    assert merf["ε=10 CA % privbench"] == "27.0 ± 2.8" and merf["ε=10 CA % published"] == "29.0"
    # methods only the paper ran, and datasets privbench has no runs on, still show the paper's numbers
    assert cells[("cifar10", "pdp-diffusion")]["ε=10 FID privbench"] == "-"
    assert cells[("cifar10", "pdp-diffusion")]["ε=10 FID published"] == "18.4"
    assert cells[("mnist", "privimage")]["ε=10 FID published"] == "2.3"
    assert "no runs on mnist" in cells[("mnist", "privimage")]["provenance"]


def test_side_by_side_markdown_ends_each_block_with_both_provenances(store):
    text = side_by_side(store.runs(), load_published("dpimagebench"), "md")
    block = text[text.index("### cifar10"):text.index("### fashion-mnist")]
    row = next(line for line in block.splitlines() if line.startswith("| privimage (smoke)"))
    assert "12.0 ± 2.8" in row and "13.1" in row
    note = block.strip().splitlines()[-1]
    assert "Chen et al. 2025, DPImageBench (arXiv:2503.14681)" in note and "preset smoke" in note
    assert "commit 0123abcd" in note
    latex = side_by_side(store.runs(), load_published("dpimagebench"), "latex")
    assert "\\toprule" in latex and "% published: Chen et al. 2025" in latex


def test_unknown_paper_is_a_one_line_error_naming_the_choices():
    with pytest.raises(PrivbenchError) as error:
        load_published("nosuchpaper")
    message = str(error.value)
    assert "\n" not in message and "'nosuchpaper'" in message
    assert "dpimagebench" in message


@pytest.mark.parametrize("content, complaint", [
    ("dataset,method,epsilon,metric,value\ncifar10,dpdm,1,fid,3.0\n", "lacks the column(s) source"),
    ("dataset,method,epsilon,metric,value,source\ncifar10,dpdm,1,fid,about 3,Table 1\n", "line 2 has a non-numeric value"),
    ("dataset,method,epsilon,metric,value,source\ncifar10,dpdm,one,fid,3,Table 1\n", "non-numeric epsilon"),
    ("dataset,method,epsilon,metric,value,source\ncifar10,dpdm,1,fid,3,\n", "an empty source"),
    ("dataset,method,epsilon,metric,value,source\ncifar10,dpdm,1,is,3,Table 1\n", "a metric other than fid or ca"),
    ("dataset,method,epsilon,metric,value,source\nmnist,dpdm,1,ca,9,T1\nmnist,dpdm,1,ca,8,T2\n", "a repeated cell"),
])
def test_a_malformed_published_table_is_refused(tmp_path, content, complaint):
    path = tmp_path / "mine.csv"
    path.write_text(content)
    with pytest.raises(PrivbenchError, match=re.escape(complaint)):
        load_published(path)


def test_an_explicit_csv_path_loads_the_same_table():
    assert load_published(PAPER_DIR / "dpimagebench.csv").equals(load_published("dpimagebench"))


@pytest.mark.parametrize("name", PAPERS)
def test_every_published_csv_parses_and_cites_each_row(name):
    table = load_published(name)
    assert list(table.columns) == ["dataset", "method", "epsilon", "metric", "value", "source"]
    assert (table["source"].str.len() > 0).all()
    assert set(table["metric"]) <= {"fid", "ca"}
    assert set(table["method"]) <= set(METHODS.names())  # rows name methods privbench runs
    assert table.loc[table["metric"] == "ca", "value"].between(1, 100).all()  # percent, not a fraction
    assert (table.loc[table["metric"] == "fid", "value"] > 0).all()


def _png(data):
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_metric_vs_epsilon_is_a_png_of_sensible_size(store):
    for metric in ("fid", "ca"):
        image = _png(metric_vs_epsilon(store.runs(), "cifar10", metric))
        assert 400 <= image.width <= 2000 and 300 <= image.height <= 2000
    assert _png(metric_vs_epsilon(store.runs().drop(columns="ca"), "cifar10", "ca")).width >= 400  # "no ca recorded"
    with pytest.raises(PrivbenchError, match="no finished runs on dataset 'mnist'"):
        metric_vs_epsilon(store.runs(), "mnist", "fid")


def test_sample_sheet_grows_with_methods_and_epsilons(store):
    runs = store.runs()
    full = _png(sample_sheet(runs, "cifar10"))  # 2 methods x 3 epsilons, with missing samples.png
    one = _png(sample_sheet(runs[runs["method"] == "privimage"], "cifar10"))
    assert full.height > one.height and full.width == one.width


def test_write_plots_writes_the_three_figures_per_dataset(store, tmp_path):
    paths = write_plots(store.runs(), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["ca_vs_eps_cifar10.png", "fid_vs_eps_cifar10.png", "samples_cifar10.png"]
    for path in paths:
        assert _png(path.read_bytes()).width > 0


def test_cli_table_paper_prints_the_comparison_and_writes_plots(store, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert cli.main(["table", "--out", str(store.root), "--paper", "dpimagebench", "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "### cifar10" in out and "### mnist" in out
    row = next(line for line in out.splitlines() if line.startswith("| privimage (smoke)"))
    assert "12.0 ± 2.8" in row and "13.1" in row
    assert str(plots / "samples_cifar10.png") in out and (plots / "fid_vs_eps_cifar10.png").is_file()


def test_cli_table_paper_errors_are_one_line(store, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("dataset,method,epsilon,metric,value,source\n")
    assert cli.main(["table", "--out", str(store.root), "--paper", "nosuchpaper"]) == 2
    assert cli.main(["table", "--out", str(store.root), "--paper", str(empty)]) == 2
    assert cli.main(["table", "--out", str(store.root), "--paper", "dpimagebench", "--dataset", "celeba64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown paper 'nosuchpaper'" in err[0]
    assert "has no published numbers" in err[1] and "no published numbers on celeba64" in err[2]


def test_cost_table_marks_reused_work_and_leaves_it_out_of_the_total():
    from privbench.report.tables import cost_table

    runs = pd.DataFrame([{"run_id": "a", "method": "privimage", "preset": "smoke", "target_epsilon": 10.0, "seed": 0}])
    costs = pd.DataFrame([
        {"run_id": "a", "stage": "pretrain", "wall_s": 240.0, "reused": 1, "peak_host_bytes": 2**30, "params": 280_000},
        {"run_id": "a", "stage": "dp-train", "wall_s": 38.4, "reused": 0, "peak_host_bytes": 2**31, "params": 280_000},
        {"run_id": "a", "stage": "sample", "wall_s": 61.6, "reused": 0, "peak_host_bytes": 2**30, "params": 280_000},
        {"run_id": "b", "stage": "sample", "wall_s": 1.0, "reused": 0, "peak_host_bytes": 1, "params": 1},
    ])
    (row,) = cost_table(runs, costs).to_dict("records")
    assert row["pretrain s"] == "240 (reused)" and row["dp-train s"] == "38" and row["total s"] == "100"
    assert row["peak host GiB"] == "2.0" and row["generator params"] == "280,000" and row["ε"] == "10"
    # DP-SGD's share of the fit counts the cached pre-training at its original cost.
    assert row["DP-SGD % of fit"] == "14"


def test_cost_table_gives_no_dp_sgd_share_to_a_method_without_dp_sgd():
    from privbench.report.tables import cost_table

    runs = pd.DataFrame([{"run_id": "a", "method": "dp-merf", "preset": "cpu", "target_epsilon": 1.0, "seed": 0}])
    costs = pd.DataFrame([
        {"run_id": "a", "stage": "fit", "wall_s": 150.0, "reused": 0, "peak_host_bytes": 2**30, "params": 9},
        {"run_id": "a", "stage": "sample", "wall_s": 1.0, "reused": 0, "peak_host_bytes": 2**30, "params": 9},
    ])
    (row,) = cost_table(runs, costs).to_dict("records")
    assert row["DP-SGD % of fit"] == "-" and row["total s"] == "151"
