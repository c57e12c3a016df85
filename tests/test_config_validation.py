"""Every setting of every method and preset is checked when the configuration is resolved, before any
data is read: a bad value is one line naming its dotted key and a fix."""

from pathlib import Path

import pandas as pd
import pytest

import privbench.methods
from privbench import cli
from privbench.config import PRESETS, from_dict, parse_overrides, resolve
from privbench.errors import PrivbenchError
from privbench.methods import METHODS, presets
from privbench.registry import Registry

HARNESS_KEYS = {
    "eval.samples": "0",
    "eval.ca_classifiers": "resnet20,resnet21",  # unknown classifier
    "eval.ca_lr": "0",
    "data.validation_fraction": "1.5",
    "audit.calibration_fraction": "0",
    "audit.spaces": "pixels",
    "compute.precision": "fp16",
}
METHOD_KEYS = {
    "dp-merf": {"params.epochs": "-5", "params.batch_size": "0", "params.lr": "-0.01", "params.lr_decay": "1.5",
                "params.d_rff": "999"},
    "dp-gan": {"params.d_lr": "0", "params.epochs": "-1", "params.grad_sample_mode": "ghost", "params.betas": "0.5",
               "params.d_updates": "0", "params.d_channels": "16,0"},
    "gs-wgan": {"params.discriminators": "0", "params.critic_iters": "0", "params.warmup_iters": "-1",
                "params.clip_norm": "0", "params.gp_weight": "-1"},
    "dp-kernel": {"params.bandwidths": "1,-2", "params.d_rff": "2002", "params.member_batch": "0",
                  "params.optimizer": "sgd", "params.z_dim": "0"},
    "dp-ldm": {"params.tuned_attention_from": "0", "params.autoencoder.kl_weight": "-1", "params.autoencoder.steps": "0",
               "params.autoencoder.channel_mult": "1,0", "params.dp.clip_norm": "0"},
    "dp-lora": {"params.lora_rank": "0", "params.autoencoder.latent_channels": "0", "params.autoencoder.lr": "0",
                "params.pretrain.steps": "0"},
    "dp-ntk": {"params.ntk_widths": "0", "params.ntk_outputs": "-1", "params.steps": "0", "params.decay_every": "0",
               "params.kernel_size": "4"},
    "dpdm": {"params.dp.epochs": "-5", "params.dp.logical_batch": "0", "params.dp.grad_sample_mode": "funtorch",
             "params.dp.lr": "0", "params.dp.ema_decay": "1", "params.sampler.steps": "1", "params.unet.channel_mult": "1,-2"},
    "pdp-diffusion": {"params.dp.grad_sample_mode": "ghosts", "params.pretrain.lr": "0", "params.pretrain.batch_size": "0",
                      "params.pretrain.label_dropout": "1.5"},
    "pe": {"params.population": "0", "params.lookahead": "-1", "params.threshold": "-2", "params.embedding": "clip",
           "params.variation_degrees": "1,-1", "params.sampler_steps": "1", "params.pretrain.steps": "0"},
    "privimage": {"params.dp.grad_sample_mode": "book-keeping", "params.query.classifier": "resnet21",
                  "params.query.epochs": "0", "params.query.sigma": "-1", "params.pretrain.steps": "-1"},
    "dp-feta": {"params.central.batch_size": "0", "params.central.sigma": "-5", "params.central.releases": "0",
                "params.central.downsample": "0", "params.central.augment_copies": "0", "params.pretrain.lr": "0"},
    "dp-feta-pro": {"params.frequency.sigma": "0", "params.frequency.downsample": "0", "params.frequency.samples": "0",
                    "params.frequency.d_rff": "999", "params.frequency_pretrain.steps": "0", "params.central.sigma": "-5"},
}
CASES = [(m, p, key, value) for m in METHODS.names() for p in PRESETS
         for key, value in {**HARNESS_KEYS, **METHOD_KEYS[m]}.items()]


def resolved(method: str, preset: str = "smoke", sets=(), dataset: str = "mnist", epsilon: float = 1.0):
    return resolve(METHODS.get(method), dataset, epsilon, 0, preset, "cpu", parse_overrides(list(sets)))


def test_every_method_has_representative_bad_values():
    assert set(METHOD_KEYS) == set(METHODS.names())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", METHODS.names())
def test_presets_resolve_and_validate(method, preset):
    for dataset in ("mnist", "cifar10"):
        config = resolved(method, preset, dataset=dataset)
        assert from_dict(config.to_dict()) == config  # a stored configuration validates the same way


@pytest.mark.parametrize("method, preset, key, value", CASES)
def test_a_bad_value_is_refused_naming_its_key(method, preset, key, value):
    with pytest.raises(PrivbenchError) as refused:
        resolved(method, preset, [f"{key}={value}"])
    message = str(refused.value)
    assert message.startswith(f"setting '{key}' must be ") and len(message.splitlines()) == 1


def test_the_message_gives_the_range_and_the_preset_value_as_a_fix():
    with pytest.raises(PrivbenchError, match=r"^setting 'params.epochs' must be a positive integer, got -5: "
                                             r"e.g. --set params.epochs=30$"):
        resolved("dp-merf", sets=["params.epochs=-5"])
    with pytest.raises(PrivbenchError, match=r"setting 'params.dp.grad_sample_mode' must be one of: functorch, hooks, "
                                             r"ghost, bookkeeping, got funtorch \(did you mean 'functorch'\?\)"):
        resolved("privimage", sets=["params.dp.grad_sample_mode=funtorch"])


@pytest.mark.parametrize(
    "method, sets, complaint",
    [
        ("dpdm", ["params.dp.grad_sample_mode=ghost", "params.dp.multiplicity=2"], "'params.dp.multiplicity' must be 1 under ghost"),
        ("dpdm", ["params.unet.base_channels=3"], "without a common GroupNorm group count"),
        ("dp-merf", ["eval.fid_samples=3000"], "'eval.fid_samples' (3000) exceeds 'eval.samples' (2000)"),
        ("dp-merf", ["eval.pr_k=8", "eval.fid_reference=8"], "'eval.pr_k' must be below"),
        ("pe", ["params.sampler_steps=6", "params.variation_degrees=2,6"], "'params.variation_degrees' must index the sampler's 6"),
        ("dp-merf", ["seed=-1"], "seed must be a non-negative integer"),
        ("dp-merf", ["eval.ca_classifiers=[]"], "'eval.ca_classifiers' must be a non-empty list"),
        ("dp-merf", ["audit.attacks=nearest,pi"], "'audit.attacks' must be a non-empty list, each one of the attacks"),
    ],
)
def test_settings_that_only_fail_together_are_refused(method, sets, complaint):
    with pytest.raises(PrivbenchError) as refused:
        resolved(method, sets=sets)
    assert complaint in str(refused.value)


def test_one_number_where_a_list_is_expected_is_a_list_of_one():
    assert resolved("dp-ntk", sets=["params.ntk_widths=800"]).params.ntk_widths == (800,)
    assert resolved("dp-ntk", sets=["params.ntk_widths=32,256"]).params.ntk_widths == (32, 256)


def test_null_is_accepted_where_it_has_a_meaning():
    config = resolved("privimage", sets=["params.dp.physical_batch=null", "params.class_counts_sigma=null",
                                         "eval.fid_reference=null", "audit.members=null", "data.resolution=null"])
    assert config.params.dp.physical_batch is None and config.eval.fid_reference is None


def test_a_stored_configuration_with_a_bad_value_is_refused():
    stored = resolved("dp-merf").to_dict()
    stored["params"]["lr"] = 0.0
    with pytest.raises(PrivbenchError, match="setting 'params.lr' must be a finite number > 0, got 0"):
        from_dict(stored)


@pytest.mark.parametrize("board", ["smoke", "cpu"])
@pytest.mark.parametrize("method", METHODS.names())
def test_the_code_keeps_the_committed_boards_config_hashes(method, board):
    # A change to what a run's configuration holds changes its hash: the board's cells must then be
    # regenerated with it, or `privbench check` and `--cells` would treat them as other runs.
    cells = pd.read_csv(Path(__file__).parents[1] / "leaderboards" / board / "mnist.csv")
    assert len(cells[cells["method"] == method]) > 0
    for _, cell in cells[cells["method"] == method].iterrows():
        config = resolve(METHODS.get(method), cell["dataset"], cell["target_epsilon"], int(cell["seed"]), cell["preset"], "cpu", {})
        assert config.digest() == cell["config_hash"], (board, cell["run_id"])


# The overrides leaderboards/cpu/cifar10.csv's cells were run with (leaderboards/README.md, the CIFAR-10
# board), by preset: DP-MERF at paper, the other methods at cpu (32 px). Their data.path is where the
# runs read the JPEG development copy (/work/shared/data/README).
CIFAR10_EVAL = ["eval.samples=10000", "eval.fid_samples=1000", "eval.fid_reference=1000", "eval.ca_classifiers=[resnet20]",
                "eval.ca_epochs=10", "eval.ca_batch_size=128", "eval.ca_lr=0.002"]
CIFAR10_BOARD_SETS = {
    "paper": ["data.path=/work/shared/data/cifar10-jpeg.zip", "data.non_members=500", "compute.precision=fp32",
              "compute.channels_last=false", *CIFAR10_EVAL, "audit.members=500", "audit.spaces=[pixel]"],
    "cpu": ["data.path=/work/shared/data/cifar10-jpeg.zip", "data.resolution=32", *CIFAR10_EVAL],
}


def test_the_code_keeps_the_cifar10_board_s_config_hashes():
    cells = pd.read_csv(Path(__file__).parents[1] / "leaderboards" / "cpu" / "cifar10.csv")
    assert {"dp-merf", "dp-kernel"} <= set(cells["method"])
    for _, cell in cells.iterrows():
        config = resolve(METHODS.get(cell["method"]), cell["dataset"], cell["target_epsilon"], int(cell["seed"]),
                         cell["preset"], "cpu", parse_overrides(CIFAR10_BOARD_SETS[cell["preset"]]))
        assert config.preset_fallback is None and config.digest() == cell["config_hash"], cell["run_id"]


@pytest.mark.parametrize(
    "argv, complaint",
    [
        (["--method", "dp-merf", "--set", "params.epochs=-5"], "setting 'params.epochs' must be a positive integer, got -5"),
        (["--method", "privimage", "--set", "params.dp.grad_sample_mode=funtorch"], "setting 'params.dp.grad_sample_mode'"),
    ],
)
def test_the_cli_refuses_a_bad_setting_before_any_work(argv, complaint, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--eps", "10", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert complaint in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # no database, no run directory


class NoPresets:
    """A method whose module has no YAML file beside it."""

    name = "no-presets"


@pytest.mark.parametrize(
    "content, complaint",
    [
        (None, "method 'no-presets' has no preset file "),
        ("smoke: {epochs: [1, 2}", "is not valid YAML"),
        ("- smoke\n- cpu\n", "must map preset names to settings"),
    ],
)
def test_a_missing_or_malformed_preset_file_is_one_line_naming_the_method_and_the_file(content, complaint, tmp_path,
                                                                                        monkeypatch):
    expected = tmp_path / f"{__name__.rsplit('.', 1)[-1]}.yaml"
    if content is not None:
        expected.write_text(content)
    monkeypatch.setattr(privbench.methods.resources, "files", lambda package: tmp_path)
    with pytest.raises(PrivbenchError) as refused:
        presets(NoPresets)
    message = str(refused.value)
    assert complaint in message and str(expected) in message and "'no-presets'" in message
    assert len(message.splitlines()) == 1


def test_the_cli_refuses_a_method_without_presets_in_one_line(tmp_path, monkeypatch, capsys):
    methods = Registry("method")
    methods.register(NoPresets.name)(NoPresets)
    monkeypatch.setattr(privbench.methods, "METHODS", methods)
    assert cli.main(["run", "--method", "no-presets", "--eps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method 'no-presets' has no preset file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
