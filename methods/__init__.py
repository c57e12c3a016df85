"""Synthesis methods, one module each, found by name: `--method dp-merf` resolves here.

A method is a class registered in METHODS with
  name: str                       the registry name
  Config: type                    a frozen dataclass of its hyperparameters; presets fill it from
                                  the YAML file beside the module (`<module>.yaml`); its
                                  validate(where) gives every field a range (privbench.checks);
                                  an optional check_resolution(resolution, where) refuses, at
                                  validation, networks that do not fit the run's image side
  uses_public: bool               whether `Task.public` must be loaded
  trains_with_dp_sgd: bool        (optional, default False) whether `fit` trains in one DPSGDPhase,
                                  so that a canary run (audit.canaries) can audit it
  __init__(config)
  fit(task, ledger, ctx) -> Synthesizer      records every use of the members in `ledger`
  restore(state, task, ctx) -> Synthesizer   rebuilds a fitted synthesizer from `state_dict()`
and a synthesizer offers
  sample(n, labels=None, generator=None) -> ImageSet    labels default to the (private) class mix
  state_dict() -> dict                                   tensors and plain values, for torch.save
  parameters: int                                        size of the model, for the cost table
  capabilities: frozenset[str]                           what white-box attacks may use, from
                                                         privbench.capabilities (DENOISER); empty
                                                         for a synthesizer the audit sees only
                                                         through its samples

Adding a method `foo`:
  1. `methods/foo.py`: the class above, registered with `@METHODS.register("foo")`. `fit` reads
     `task.members` only through mechanisms recorded in the ledger (`ledger.calibrate` and
     `ledger.record`, `release_gaussian`, `train_dp_sgd`), so that the composed epsilon covers
     every use. A diffusion method subclasses `DiffusionMethod` (privbench.diffusion.pipeline)
     instead and inherits the shared presets of `diffusion.yaml` through `preset_files`.
  2. `methods/foo.yaml`: one block per preset, `smoke`, `cpu`, `small` and `paper`; the paper
     values with the source file and commit they come from in a comment beside them. A block may
     hold entries per dataset and, within those, per epsilon (`preset_values`), where the source
     configures them apart.
  3. Its module in the import line at the end of this file.
  4. `capabilities` on its synthesizer: DENOISER only if it samples with an EDM network `net`;
     otherwise empty, and only the black-box attacks audit it.
  5. Tests: a privacy test (the release moves by at most its sensitivity between neighbouring
     member sets, and the ledger composes to the target) and a smoke run through the harness, as
     in tests/test_mean_embedding.py and tests/test_diffusion_methods.py.
  6. Its cells on the smoke and cpu boards (leaderboards/{smoke,cpu}/mnist.csv, see
     leaderboards/README.md): tests/test_config_validation.py requires them of every method.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.dp import PrivacyLedger
from privbench.errors import PrivbenchError
from privbench.registry import Registry
from privbench.settings import merge


class Synthesizer(Protocol):
    capabilities: frozenset[str]

    def sample(self, n: int, labels: np.ndarray | None = None, generator: torch.Generator | None = None) -> ImageSet: ...

    def state_dict(self) -> dict[str, Any]: ...

    @property
    def parameters(self) -> int: ...


class Method(Protocol):
    name: str
    Config: type
    uses_public: bool

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> Synthesizer: ...

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> Synthesizer: ...


METHODS: Registry[type] = Registry("method")


DATASETS_KEY, EPS_KEY = "datasets", "eps"  # in a preset block: its entries per dataset, and theirs per epsilon


def presets(method: type) -> dict[str, dict[str, Any]]:
    """The presets of `method`, each as the values it gives every dataset and epsilon (without the
    entries per dataset that `preset_values` lays over them)."""
    return {name: {k: v for k, v in block.items() if k != DATASETS_KEY} for name, block in _preset_blocks(method).items()}


def preset_values(method: type, preset: str, dataset: str, epsilon: float) -> tuple[dict[str, Any], str | None]:
    """`method`'s values of `preset` for a run on `dataset` at `epsilon`, and the entry that stood in
    for theirs (None where none had to).

    A preset block may hold entries per dataset, and those entries per epsilon:

        paper:
          lr: 0.01                  # every dataset and epsilon
          datasets:
            cifar10:
              lr: 0.005             # cifar10 at any epsilon
              eps:
                10: {lr: 0.002}     # cifar10 at eps 10

    laid over one another in that order, so that the most specific value wins. A block with entries
    per dataset names the datasets its source configures: on any other its own values stand in, and
    the stand-in is returned as the preset's name ("paper"); likewise a dataset entry with entries per
    epsilon, at any other epsilon ("paper/cifar10"). A block without entries is one setting for all.
    """
    blocks = _preset_blocks(method)
    if preset not in blocks:
        raise PrivbenchError(f"method {method.name!r} has no preset {preset!r}")
    values = dict(blocks[preset])
    by_dataset = values.pop(DATASETS_KEY, None)
    if by_dataset is None:
        return values, None
    if dataset not in by_dataset:
        return values, preset
    entry = dict(by_dataset[dataset])
    by_eps = entry.pop(EPS_KEY, None)
    values = merge(values, entry)
    if by_eps is None:
        return values, None
    at_eps = next((settings for eps, settings in by_eps.items() if float(eps) == epsilon), None)
    if at_eps is None:
        return values, f"{preset}/{dataset}"
    return merge(values, at_eps), None


def _preset_blocks(method: type) -> dict[str, dict[str, Any]]:
    """The preset blocks of `method`, entries per dataset included: the YAML file named like its
    module, beside it.

    A method may list shared files first in `preset_files` (the diffusion methods share one model,
    DP-SGD and sampler setting per preset in `diffusion.yaml`); later files override earlier ones
    key by key, entries per dataset and epsilon too, so the module's own file has the last word.
    """
    module = method.__module__.rsplit(".", 1)[-1]
    merged: dict[str, dict[str, Any]] = {}
    for name in getattr(method, "preset_files", (module,)):
        for preset, settings in _preset_file(method, name).items():
            merged[preset] = merge(merged.get(preset, {}), settings)
    return merged


def _preset_file(method: type, name: str) -> dict[str, Any]:
    path = resources.files(__name__).joinpath(f"{name}.yaml")
    fix = "one block of settings per preset (smoke, cpu, small, paper), see methods/__init__.py"
    if not path.is_file():
        raise PrivbenchError(f"method {method.name!r} has no preset file {path}: add it beside its module with {fix}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())
        raise PrivbenchError(f"method {method.name!r}: {path} is not valid YAML ({reason}): fix it to hold {fix}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise PrivbenchError(f"method {method.name!r}: {path} must map preset names to settings: write {fix}")
    for preset, block in data.items():
        _check_entries(f"method {method.name!r}: {path}", preset, block.get(DATASETS_KEY))
    return data


def _check_entries(where: str, preset: str, by_dataset: Any) -> None:
    """A block's entries per dataset and epsilon (preset_values) name sensitive datasets and epsilons,
    and hold settings: a misspelt name would otherwise never match, and its values would silently not apply.
    A user's folder (role "either") may be a run's sensitive set, so it may have an entry too."""
    from privbench.data import DATASETS

    if by_dataset is None:
        return
    sensitive = [n for n in DATASETS.names() if DATASETS.get(n).role != "public"]
    key = f"{preset}.{DATASETS_KEY}"
    if not isinstance(by_dataset, dict) or not all(isinstance(v, dict) for v in by_dataset.values()):
        raise PrivbenchError(f"{where}: {key} must map dataset names to settings, "
                             f"e.g. {DATASETS_KEY}: {{cifar10: {{lr: 0.01}}}}")
    for dataset, entry in by_dataset.items():
        if dataset not in sensitive:
            raise PrivbenchError(f"{where}: {key} names {dataset!r}, which is not a sensitive dataset: "
                                 f"use one of {', '.join(sensitive)}")
        by_eps = entry.get(EPS_KEY)
        if by_eps is None:
            continue
        where_eps = f"{key}.{dataset}.{EPS_KEY}"
        if not isinstance(by_eps, dict) or not all(isinstance(v, dict) for v in by_eps.values()):
            raise PrivbenchError(f"{where}: {where_eps} must map epsilons to settings, "
                                 f"e.g. {EPS_KEY}: {{10: {{lr: 0.01}}}}")
        for eps in by_eps:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
                raise PrivbenchError(f"{where}: {where_eps} has the key {eps!r}, which is not an epsilon: "
                                     "write a number > 0 (.inf for no privacy), e.g. 10:")


from privbench.methods import dp_feta, dp_feta_pro, dp_gan, dp_kernel, dp_ldm, dp_lora, dp_merf, dp_ntk, dpdm, gs_wgan, pdp_diffusion, pe, privimage  # noqa: E402  (register themselves)

__all__ = ["METHODS", "Method", "Synthesizer", "presets", "preset_values", "dp_feta", "dp_feta_pro", "dp_gan", "dp_kernel", "dp_ldm", "dp_lora", "dp_merf",
           "dp_ntk", "dpdm", "gs_wgan", "pdp_diffusion", "pe", "privimage"]
