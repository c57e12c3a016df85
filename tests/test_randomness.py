"""privacy.randomness: the mechanisms' noise and Poisson sampling from the run seed or from the OS,
drawn through RunContext.mechanism_generator; recorded with the run and marked in tables."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from privbench.config import build, parse_overrides, resolve
from privbench.privacy import PrivacyConfig
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.diffusion.pipeline import release_class_proportions
from privbench.dp import PrivacyLedger, train_dp_sgd
from privbench.errors import PrivbenchError
from privbench.harness import run
from privbench.methods import METHODS, presets
from privbench.methods import privimage
from privbench.report import render
from privbench.store import Store

DPMERF = METHODS.get("dp-merf")
CLASSES = ("zero", "one")


def members(n: int = 40) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), np.arange(n, dtype=np.int64) % 2, CLASSES,
                    "members")


def context(tmp_path, randomness: str) -> RunContext:
    return RunContext(tmp_path, tmp_path, torch.device("cpu"), seed=3, progress=False, privacy=PrivacyConfig(randomness))


def fit_dp_merf(tmp_path, randomness: str, epsilon: float = 2.0) -> tuple[torch.Tensor, PrivacyLedger]:
    config = build(DPMERF.Config, {**presets(DPMERF)["smoke"], "d_rff": 40, "epochs": 1, "batch_size": 20,
                                   "channels": [4], "hidden": 8})
    ledger = PrivacyLedger(epsilon, 1e-5, randomness=randomness)
    synthesizer = DPMERF(config).fit(Task(members(), None, CLASSES), ledger, context(tmp_path, randomness))
    return torch.cat([p.detach().flatten() for p in synthesizer.generator.parameters()]), ledger


def fit_dp_sgd(tmp_path, randomness: str, epsilon: float = 2.0) -> tuple[torch.Tensor, PrivacyLedger]:
    data = members()
    x, y = torch.from_numpy(data.images).flatten(1).float() / 255, torch.from_numpy(data.labels)
    torch.manual_seed(0)  # model initialisation: seeded whatever the setting
    model = nn.Linear(64, 2)
    ledger = PrivacyLedger(epsilon, 1e-5, "rdp", randomness=randomness)
    result = train_dp_sgd(model, lambda m, xr, yr: nn.functional.cross_entropy(m(xr), yr, reduction="none"), [x, y],
                          ledger, context(tmp_path, randomness), logical_batch=8, physical_batch=8, steps=3, lr=0.5,
                          optimizer="sgd", clip_norm=1.0)
    return torch.cat([p.detach().flatten() for p in result.model.parameters()]), ledger


@pytest.mark.parametrize("fit, epsilon", [(fit_dp_merf, 2.0), (fit_dp_sgd, 2.0), (fit_dp_sgd, math.inf)],
                         ids=["dp-merf release", "dp-sgd noise and sampling", "dp-sgd sampling alone"])
def test_os_randomness_draws_anew_from_the_same_seed_at_the_same_epsilon(tmp_path, fit, epsilon):
    """Seeded fits repeat bit for bit; fits with noise from the OS differ from each other and from the
    seeded one (at eps = inf DP-SGD adds no noise: its Poisson batches alone differ), and all spend alike."""
    seeded = [fit(tmp_path, "seeded", epsilon) for _ in range(2)]
    fresh = [fit(tmp_path, "os", epsilon) for _ in range(2)]
    assert torch.equal(seeded[0][0], seeded[1][0])
    assert not torch.allclose(fresh[0][0], fresh[1][0]) and not torch.allclose(fresh[0][0], seeded[0][0])
    spent = {ledger.spent() for _, ledger in seeded + fresh}
    assert len(spent) == 1 and (math.isinf(epsilon) or 0.99 * epsilon <= spent.pop() <= epsilon * (1 + 1e-6))
    assert [ledger.to_dict()["randomness"] for _, ledger in seeded + fresh] == ["seeded", "seeded", "os", "os"]


def test_every_mechanism_draws_through_the_one_place(tmp_path, monkeypatch):
    """Each mechanism's noise and sampling ask RunContext.mechanism_generator, under the stage names
    whose seeded streams the committed runs drew (so those runs keep their numbers)."""
    drawn = []
    real = RunContext.mechanism_generator

    def spy(self, stage, on_device=False):
        drawn.append(stage)
        return real(self, stage, on_device)

    monkeypatch.setattr(RunContext, "mechanism_generator", spy)
    ctx, task = context(tmp_path, "os"), Task(members(), members(60), CLASSES)

    def drawn_by(action) -> list[str]:
        drawn.clear()
        action()
        return sorted(drawn)

    assert drawn_by(lambda: fit_dp_merf(tmp_path, "os", math.inf)) == ["release"]
    assert drawn_by(lambda: fit_dp_sgd(tmp_path, "os", math.inf)) == ["dp-sgd-noise", "dp-sgd-sampling"]
    assert drawn_by(lambda: release_class_proportions(task, PrivacyLedger(10.0, 1e-5), 5.0, ctx)) == ["class-counts"]
    public = ImageSet(members(60).images, np.arange(60, dtype=np.int64) % 6, tuple("abcdef"), "public")
    monkeypatch.setattr(privimage, "query_classifier", lambda *_: nn.Sequential(nn.Flatten(), nn.Linear(64, 6)))
    query = privimage.QueryConfig("cnn", 1, 8, 0.01, top_k=1, sigma=20.0, classes_per_class=2)
    method = privimage.PrivImage(SimpleNamespace(query=query))
    task = Task(members(), public, CLASSES)
    assert drawn_by(lambda: method.pretraining_set(task, PrivacyLedger(10.0, 1e-5), ctx)) == ["semantic-query"]


def test_the_default_setting_keeps_the_committed_config_hash():
    cells = pd.read_csv("leaderboards/smoke/mnist.csv")
    committed = cells[(cells["method"] == "dp-merf") & (cells["target_epsilon"] == 10)]["config_hash"].iloc[0]
    assert committed == "e7685c606b"
    default = resolve(DPMERF, "mnist", 10.0, 0, "smoke", "cpu", {})
    assert default.privacy == PrivacyConfig("seeded") and default.digest() == committed
    explicit = resolve(DPMERF, "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(["privacy.randomness=seeded"]))
    assert explicit.digest() == committed
    os_config = resolve(DPMERF, "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(["privacy.randomness=os"]))
    assert os_config.privacy.randomness == "os" and os_config.digest() != committed  # another run


def test_an_unknown_randomness_is_a_one_line_error_naming_the_setting():
    with pytest.raises(PrivbenchError) as refused:
        resolve(DPMERF, "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(["privacy.randomness=urandom"]))
    message = str(refused.value)
    assert "\n" not in message and "'privacy.randomness'" in message and "seeded, os" in message
    assert "'urandom'" in message


def test_the_run_hands_the_setting_to_its_mechanisms_and_its_ledger(tmp_path, monkeypatch):
    config = resolve(DPMERF, "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["privacy.randomness=os"]))
    seen = {}

    class Stop(Exception):
        pass

    def fit(self, task, ledger, ctx):
        seen.update(ctx=ctx.privacy, ledger=ledger.randomness)
        raise Stop

    monkeypatch.setattr(DPMERF, "fit", fit)
    store = Store(tmp_path)
    with pytest.raises(Stop):
        run(config, store, progress=False, audit=False)
    assert seen == {"ctx": PrivacyConfig("os"), "ledger": "os"}
    # That fit began and never finished: a new one would draw other noise than what the first logged.
    with pytest.raises(PrivbenchError, match="began a fit with noise from the OS and never finished it"):
        run(config, store, progress=False, audit=False)


def test_tables_mark_runs_with_noise_from_the_os(tmp_path):
    store = Store(tmp_path)
    row = {"method": "dp-merf", "dataset": "mnist", "preset": "smoke", "seed": 0, "delta": 1e-5, "accountant": "prv",
           "config_hash": "h", "commit_id": None, "device": "cpu", "finished": "now", "run_dir": "r"}
    store.record({**row, "run_id": "seeded", "target_epsilon": 1.0, "epsilon": 0.99,
                  "config": json.dumps({"privacy": {"randomness": "seeded"}})}, {"fid": (50.0, {})}, [])
    store.record({**row, "run_id": "old", "target_epsilon": 2.0, "epsilon": 1.99, "config": "{}"}, {"fid": (40.0, {})}, [])
    plain = render(store.runs(), "md")
    assert "†" not in plain
    store.record({**row, "run_id": "os", "target_epsilon": 10.0, "epsilon": 9.9,
                  "config": json.dumps({"privacy": {"randomness": "os"}})}, {"fid": (30.0, {})}, [])
    table = render(store.runs(), "md")
    header, _, cells = [line.strip("|").split("|") for line in table.splitlines()[2:5]]
    spent = {h.strip(): c.strip() for h, c in zip(header, cells) if h.strip().endswith("spent")}
    assert spent == {"ε=1 spent": "0.99", "ε=2 spent": "1.99", "ε=10 spent": "9.9 †"}
    assert "† noise from OS entropy: not reproducible bit for bit" in table
    assert "% † noise from OS entropy: not reproducible bit for bit" in render(store.runs(), "latex")
