"""Presets keyed by (preset, dataset, epsilon): the published configurations they carry, the order
their entries are laid over one another, the fallback where a dataset or epsilon has no entry, and
the paper table that needs no runs."""

import logging
from pathlib import Path

import pandas as pd
import pytest

import privbench.methods
from privbench import cli
from privbench.config import from_dict, parse_overrides, resolve
from privbench.errors import PrivbenchError
from privbench.methods import METHODS, preset_values, presets

# DPImageBench's DP-MERF configuration, the same in configs/DP-MERF/mnist_28_eps1.0.yaml,
# mnist_28_eps10.0.yaml, cifar10_32_eps1.0.yaml and cifar10_32_eps10.0.yaml at
# github.com/2019ChenGong/DPImageBench@b52f514 (the commit leaderboards/paper/dpimagebench.csv cites):
# model.d_rff, model.rff_sigma, model.Generator.z_dim, train.epochs, train.batch_size, train.lr,
# train.lr_decay, gen.batch_size.
DP_MERF = {"d_rff": 10000, "rff_sigma": 105.0, "z_dim": 60, "epochs": 5, "batch_size": 100, "lr": 0.01,
           "lr_decay": 0.9, "sample_batch_size": 1000}
# DPImageBench's PrivImage configuration at the same commit. configs/PrivImage/cifar10_32_eps{1.0,10.0}.yaml:
# train.batch_size 4096, train.n_epochs 150, train.optim.params.lr 3e-4, train.loss.n_noise_samples 32,
# train.dp.max_grad_norm 0.001, model.sampler_acc.num_steps 250, model.sampler_acc.guid_scale 0.0 (privbench's
# guidance 1 + guid_scale). configs/PrivImage/mnist_28_eps{1.0,10.0}.yaml: model.sampler_acc.guid_scale 0.0 at
# both epsilons (the 0.25 at eps 10 is model.sampler_fid's, which generate() does not sample with).
PRIVIMAGE_CIFAR10 = {"dp.logical_batch": 4096, "dp.epochs": 150, "dp.lr": 3e-4, "dp.multiplicity": 32,
                     "dp.clip_norm": 0.001, "sampler.steps": 250, "sampler.guidance": 1.0}
PRIVIMAGE_MNIST = {"sampler.guidance": 1.0}

# DPImageBench's PE configuration: configs/PE/mnist_28_eps1.0.yaml at 565f8d7 (its schedules changed since
# b52f514), mnist_28_eps10.0.yaml and cifar10_32_eps{1.0,10.0}.yaml at b52f514: train.num_samples_schedule
# (60000 over 10 classes; T = its length - 1), train.variation_degree_schedule[1..T], train.lookahead_degree,
# train.count_threshold, model.api_params.timestep_respacing, model.feature_extractor inception_v3.
PE = {"population": 6000, "lookahead": 8, "embedding": "inception"}
PE_MNIST_1 = {**PE, "sampler_steps": 10, "variation_degrees": (0, 0, 1, 1, 1, 1, 2, 2, 2, 2), "threshold": 24.0}
PE_MNIST_10 = {**PE, "sampler_steps": 10, "variation_degrees": (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2), "threshold": 3.0}
PE_CIFAR10 = {**PE, "sampler_steps": 100, "variation_degrees": (2, 4, 6, 8, 10)}

PUBLISHED = [
    ("pe", "mnist", 1.0, PE_MNIST_1),
    ("pe", "mnist", 10.0, PE_MNIST_10),
    ("pe", "cifar10", 1.0, {**PE_CIFAR10, "threshold": 15.0}),
    ("pe", "cifar10", 10.0, {**PE_CIFAR10, "threshold": 2.0}),
    ("pe", "celeba32", 1.0, {**PE_CIFAR10, "population": 30000, "threshold": 15.0}),
    ("dp-merf", "mnist", 1.0, DP_MERF),
    ("dp-merf", "mnist", 10.0, DP_MERF),
    ("dp-merf", "cifar10", 1.0, DP_MERF),
    ("dp-merf", "cifar10", 10.0, DP_MERF),
    ("privimage", "cifar10", 1.0, PRIVIMAGE_CIFAR10),
    ("privimage", "cifar10", 10.0, PRIVIMAGE_CIFAR10),
    ("privimage", "mnist", 1.0, PRIVIMAGE_MNIST),
    ("privimage", "mnist", 10.0, PRIVIMAGE_MNIST),
]


def resolved(method: str, dataset: str, epsilon: float, preset: str = "paper", sets=()):
    return resolve(METHODS.get(method), dataset, epsilon, 0, preset, "cpu", parse_overrides(list(sets)))


def value(params, dotted: str):
    for part in dotted.split("."):
        params = getattr(params, part)
    return params


@pytest.mark.parametrize("method, dataset, epsilon, expected", PUBLISHED)
def test_the_paper_preset_carries_the_published_values(method, dataset, epsilon, expected):
    params = resolved(method, dataset, epsilon).params
    assert {key: value(params, key) for key in expected} == expected


def test_dp_merf_paper_on_cifar10_at_eps_10_is_dpimagebench_s_and_no_fallback(caplog):
    with caplog.at_level(logging.INFO, logger="privbench"):
        config = resolve(METHODS.get("dp-merf"), "cifar10", 10.0, 0, "paper", "cpu", {})
    assert {key: getattr(config.params, key) for key in DP_MERF} == DP_MERF
    assert config.preset_fallback is None and "stand in" not in caplog.text


@pytest.mark.parametrize(
    "dataset, epsilon, fallback, logged",
    [
        ("ham10000", 10.0, "paper", "dp-merf's paper preset has no entry for ham10000: the values of paper stand in"),
        ("celeba32", 1.0, "paper", "dp-merf's paper preset has no entry for celeba32: the values of paper stand in"),
        ("mnist", 5.0, "paper/mnist", "dp-merf's paper preset has no entry for mnist at eps 5: the values of paper/mnist stand in"),
    ],
)
def test_a_fallback_is_logged_and_recorded_in_the_config(dataset, epsilon, fallback, logged, caplog):
    with caplog.at_level(logging.WARNING, logger="privbench"):
        config = resolved("dp-merf", dataset, epsilon)
    assert logged in caplog.text
    assert config.preset_fallback == fallback and config.to_dict()["preset_fallback"] == fallback
    assert from_dict(config.to_dict()) == config  # the stored config keeps the record
    assert {key: getattr(config.params, key) for key in DP_MERF} == DP_MERF


def test_a_preset_without_entries_is_one_setting_for_every_dataset(caplog):
    with caplog.at_level(logging.WARNING, logger="privbench"):
        config = resolved("dp-merf", "ham10000", 10.0, preset="cpu")
    assert config.preset_fallback is None and "stand in" not in caplog.text
    assert config.params == resolved("dp-merf", "mnist", 10.0, preset="cpu").params


def test_the_record_of_no_fallback_leaves_the_config_hash_alone():
    # leaderboards/cpu/mnist.csv: each cell's config_hash was computed before preset_fallback existed
    cells = pd.read_csv(Path(__file__).parents[1] / "leaderboards" / "cpu" / "mnist.csv")
    for _, cell in cells[cells["method"] == "dp-merf"].iterrows():
        config = resolve(METHODS.get("dp-merf"), cell["dataset"], cell["target_epsilon"], int(cell["seed"]), cell["preset"],
                         "cpu", {})
        assert config.preset_fallback is None and config.digest() == cell["config_hash"]


def test_the_fallback_cannot_be_set():
    with pytest.raises(PrivbenchError, match="setting 'preset_fallback' records .* cannot be set: drop --set preset_fallback"):
        resolved("dp-merf", "ham10000", 10.0, sets=["preset_fallback=null"])


class Keyed:
    """A method whose preset file (keyed.yaml) the tests write."""

    name = "keyed"


def write_presets(tmp_path, monkeypatch, text: str) -> Path:
    path = tmp_path / f"{__name__.rsplit('.', 1)[-1]}.yaml"
    path.write_text(text)
    monkeypatch.setattr(privbench.methods.resources, "files", lambda package: tmp_path)
    return path


KEYED = """
paper:
  <<: &paper {lr: 0.1, epochs: 5, z_dim: 60}
  datasets:
    cifar10:
      lr: 0.2
      eps:
        10: {epochs: 9}
        .inf: {epochs: 1}
    mnist: {z_dim: 5}
small:
  <<: *paper
"""


@pytest.mark.parametrize(
    "preset, dataset, epsilon, values, fallback",
    [
        ("paper", "cifar10", 10.0, {"lr": 0.2, "epochs": 9, "z_dim": 60}, None),  # preset + dataset + eps
        ("paper", "cifar10", float("inf"), {"lr": 0.2, "epochs": 1, "z_dim": 60}, None),
        ("paper", "cifar10", 1.0, {"lr": 0.2, "epochs": 5, "z_dim": 60}, "paper/cifar10"),  # preset + dataset
        ("paper", "mnist", 1.0, {"lr": 0.1, "epochs": 5, "z_dim": 5}, None),  # a dataset without entries per eps
        ("paper", "celeba32", 10.0, {"lr": 0.1, "epochs": 5, "z_dim": 60}, "paper"),  # preset
        ("small", "cifar10", 10.0, {"lr": 0.1, "epochs": 5, "z_dim": 60}, None),  # the anchor leaves entries out
    ],
)
def test_the_most_specific_entry_wins(preset, dataset, epsilon, values, fallback, tmp_path, monkeypatch):
    write_presets(tmp_path, monkeypatch, KEYED)
    assert preset_values(Keyed, preset, dataset, epsilon) == (values, fallback)
    assert presets(Keyed)["paper"] == {"lr": 0.1, "epochs": 5, "z_dim": 60}  # without the entries


@pytest.mark.parametrize(
    "entries, complaint",
    [
        ("datasets: {cifar-10: {lr: 0.2}}", "paper.datasets names 'cifar-10', which is not a sensitive dataset: use one of"),
        ("datasets: {imagenet32: {lr: 0.2}}", "paper.datasets names 'imagenet32', which is not a sensitive dataset"),
        ("datasets: [cifar10]", "paper.datasets must map dataset names to settings"),
        ("datasets: {cifar10: {eps: {ten: {}}}}", "paper.datasets.cifar10.eps has the key 'ten', which is not an epsilon"),
        ("datasets: {cifar10: {eps: {0: {}}}}", "paper.datasets.cifar10.eps has the key 0, which is not an epsilon"),
        ("datasets: {cifar10: {eps: [1, 10]}}", "paper.datasets.cifar10.eps must map epsilons to settings"),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_method_the_file_and_the_fix(entries, complaint, tmp_path, monkeypatch):
    path = write_presets(tmp_path, monkeypatch, f"paper:\n  lr: 0.1\n  {entries}\n")
    with pytest.raises(PrivbenchError) as refused:
        preset_values(Keyed, "paper", "cifar10", 10.0)
    message = str(refused.value)
    assert complaint in message and str(path) in message and "'keyed'" in message
    assert len(message.splitlines()) == 1


def test_the_paper_table_prints_without_a_database(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no privbench-runs/results.sqlite
    assert cli.main(["table", "--paper", "dpimagebench", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    # leaderboards/paper/dpimagebench.csv, DP-MERF on CIFAR-10: CA 27.2 / 29.0 at eps 1 / 10, FID 214.1 at eps 10
    row = next(line for line in out.splitlines() if line.startswith("| dp-merf "))
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["dp-merf", "27.2", "214.1", "29.0"]
    assert "privbench |" not in out and "no results database to compare" in out
    assert list(tmp_path.iterdir()) == []  # no database made on the way


def test_a_named_database_that_is_missing_is_still_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["table", "--paper", "dpimagebench", "--out", "elsewhere"]) == 2
    assert "no results database in elsewhere" in capsys.readouterr().err
