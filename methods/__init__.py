"""Synthesis methods, one module each, found by name: `--method dp-merf` resolves here.

A method is a class registered in METHODS with
  name: str                       the registry name
  Config: type                    a frozen dataclass of its hyperparameters; presets fill it from
                                  the YAML file beside the module (`<module>.yaml`); its
                                  validate(where) gives every field a range (privbench.checks)
  uses_public: bool               whether `Task.public` must be loaded
  __init__(config)
  fit(task, ledger, ctx) -> Synthesizer      records every use of the members in `ledger`
  restore(state, task, ctx) -> Synthesizer   rebuilds a fitted synthesizer from `state_dict()`
and a synthesizer offers
  sample(n, labels=None, generator=None) -> ImageSet    labels default to the (private) class mix
  state_dict() -> dict                                   tensors and plain values, for torch.save
  parameters: int                                        size of the model, for the cost table

Adding a method is one module plus one import line below.
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


def presets(method: type) -> dict[str, dict[str, Any]]:
    """The presets of `method`: the YAML file named like its module, beside it.

    A method may list shared files first in `preset_files` (the diffusion methods share one model,
    DP-SGD and sampler setting per preset in `diffusion.yaml`); later files override earlier ones
    key by key, so the module's own file has the last word.
    """
    module = method.__module__.rsplit(".", 1)[-1]
    merged: dict[str, dict[str, Any]] = {}
    for name in getattr(method, "preset_files", (module,)):
        data = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text()) or {}
        if not isinstance(data, dict):
            raise PrivbenchError(f"{name}.yaml must map preset names to settings")
        for preset, settings in data.items():
            merged[preset] = merge(merged.get(preset, {}), settings)
    return merged


from privbench.methods import dp_kernel, dp_merf, dp_ntk, dpdm, pdp_diffusion, privimage  # noqa: E402  (register themselves)

__all__ = ["METHODS", "Method", "Synthesizer", "presets", "dp_kernel", "dp_merf", "dp_ntk", "dpdm", "pdp_diffusion", "privimage"]
