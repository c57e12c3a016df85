"""Typed run configuration: presets from YAML, dotted `--set key=value` overrides, validation.

A run's configuration is resolved in three layers, later ones winning: the harness preset
(`privbench/presets.yaml`: data and evaluation settings), the method's preset (`methods/<m>.yaml`,
under `params`; its entries for the run's dataset and epsilon laid over it, see
privbench.methods.preset_values), then the user's overrides. Every key is checked against the
dataclasses below, so a misspelt override is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import types
import typing
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from privbench.checks import (
    FRACTION, POSITIVE, POSITIVE_INT, UNCHECKED, Rule, SettingError, check_fields, each, integer, one_of, optional, shown,
)
from privbench.compute import ComputeConfig
from privbench.errors import PrivbenchError
from privbench.privacy import PrivacyConfig
from privbench.settings import merge

if typing.TYPE_CHECKING:
    from privbench.data import DatasetSpec

PRESETS = ("smoke", "cpu", "small", "paper")

log = logging.getLogger("privbench.config")


@dataclass(frozen=True)
class DataConfig:
    path: str | None  # where the sensitive dataset is; None: $PRIVBENCH_DATA/<dataset>
    public_path: str | None  # likewise for the public dataset
    resolution: int | None  # None: the sensitive dataset's native resolution
    validation_fraction: float  # share of the sensitive train split held out for CA model selection
    public_size: int | None  # images rendered for procedural public sets (glyphs); None: their default
    # The split rule (privbench.data.splits.make_split): None holds out as many non-members as there
    # are members; a number holds out that many (what the audit scores) and makes every other member.
    non_members: int | None = None
    # Public images that duplicate sensitive ones (privbench.data.overlap): refuse the run, or drop them.
    public_duplicates: str = "refuse"
    # The seeded rule that splits a user's folder with no train/test of its own (privbench.data.folder,
    # whose TEST_FRACTION and SPLIT_SEED these defaults are): the share of each class held out as test.
    test_fraction: float = 0.2
    split_seed: int = 0

    def validate(self, where: str = "data.") -> None:
        check_fields(
            self, where, path=UNCHECKED, public_path=UNCHECKED,
            resolution=optional(POSITIVE_INT, "the dataset's native resolution"),
            validation_fraction=FRACTION, public_size=optional(POSITIVE_INT, "the public set's default size"),
            non_members=optional(POSITIVE_INT, "as many non-members as members"),
            public_duplicates=one_of(("refuse", "drop")), test_fraction=FRACTION, split_seed=integer(0),
        )


@dataclass(frozen=True)
class EvalConfig:
    samples: int  # synthetic images drawn per run; CA trains on all of them
    fid_samples: int  # how many of those enter FID, precision and recall
    fid_reference: int | None  # real images forming the reference; None: the whole split
    fid_reference_split: str  # test (default) or train: the real split FID compares against
    pr_k: int  # neighbourhood size of precision and recall (Kynkäänniemi et al. use 3)
    ca_classifiers: tuple[str, ...]  # CA is the mean and std over these
    ca_epochs: int
    ca_batch_size: int
    ca_lr: float
    ca_selection_epsilon: float  # of the Laplace noisy-max epoch selection, per classifier, on validation

    def validate(self, where: str = "eval.") -> None:
        from privbench.nets import CLASSIFIERS

        check_fields(
            self, where, samples=POSITIVE_INT, fid_samples=integer(2),
            fid_reference=optional(integer(2), "the whole split"), fid_reference_split=one_of(("test", "train")),
            pr_k=POSITIVE_INT, ca_classifiers=each(one_of(CLASSIFIERS, "classifiers")), ca_epochs=POSITIVE_INT,
            ca_batch_size=POSITIVE_INT, ca_lr=POSITIVE, ca_selection_epsilon=POSITIVE,
        )
        if self.fid_samples > self.samples:
            raise PrivbenchError(f"setting '{where}fid_samples' ({self.fid_samples}) exceeds '{where}samples' ({self.samples}), "
                                 f"of which FID scores a part: e.g. --set {where}fid_samples={self.samples}")
        largest_k = min(self.fid_samples, self.fid_reference or self.fid_samples) - 1
        if self.pr_k > largest_k:
            raise PrivbenchError(f"setting '{where}pr_k' must be below the number of FID samples and reference images, "
                                 f"got {self.pr_k}: e.g. --set {where}pr_k={min(3, largest_k)}")


# Canaries of one kind: none, or enough for the one-run bound's guesses and the mechanism checks' spreads.
CANARY_COUNT = Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and (v == 0 or v >= 8),
                    "0 (none) or an integer >= 8")


@dataclass(frozen=True)
class AuditConfig:
    attacks: tuple[str, ...] | None  # None: every registered attack that applies to the method
    members: int | None  # members audited, and as many non-members; None: all of them
    calibration_fraction: float  # share of those that chooses each attack's hyperparameters
    resamples: int  # bootstrap resamples for the intervals
    spaces: tuple[str, ...]  # where black-box attacks may measure distances: pixel, inception
    # A canary run (privbench.attacks.canaries) when either is above 0: Dirac gradient canaries and
    # crafted canary examples planted in the DP-SGD phase, then the one-run bound instead of any scoring.
    canaries: int = 0
    canary_examples: int = 0

    @property
    def with_canaries(self) -> bool:
        return self.canaries > 0 or self.canary_examples > 0

    def validate(self, where: str = "audit.") -> None:
        from privbench.attacks import ATTACKS

        check_fields(
            self, where, attacks=optional(each(one_of(ATTACKS, "attacks")), "every attack that applies"),
            members=optional(integer(20), "all members"), calibration_fraction=FRACTION, resamples=POSITIVE_INT,
            spaces=each(one_of(("pixel", "inception"))), canaries=CANARY_COUNT, canary_examples=CANARY_COUNT,
        )


@dataclass(frozen=True)
class RunConfig:
    method: str
    dataset: str
    public: str | None  # None: the dataset's default public set (used only by methods that need one)
    epsilon: float
    delta: float
    accountant: str
    seed: int
    preset: str
    device: str
    data: DataConfig
    eval: EvalConfig
    audit: AuditConfig
    params: Any  # the method's own Config dataclass
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # speed settings (privbench.compute)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    # Where the method's preset has entries per dataset (or epsilon) but none for this run's: the entry
    # whose values stood in ("paper", or "paper/cifar10" at an epsilon its source does not configure).
    # Recorded, never set: see privbench.methods.preset_values.
    preset_fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A hash of every setting: two runs with the same digest compute the same thing.

        Settings added after runs were first recorded (LATER_SETTINGS) are left out at their
        defaults, which is what every run before them computed, so that those runs keep their identity.
        """
        settings = self.to_dict()
        for *parents, name in LATER_SETTINGS:
            part, value = settings, self
            for parent in parents:
                part, value = part[parent], getattr(value, parent)
            if getattr(value, name) == LATER_SETTINGS[(*parents, name)]:
                del part[name]
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        return f"{self.method}_{self.dataset}_eps{eps}_seed{self.seed}_{self.preset}_{self.digest()}"


# Settings that came after the first recorded runs -> the default every earlier run computed with.
LATER_SETTINGS: dict[tuple[str, ...], Any] = {
    ("compute",): ComputeConfig(), ("privacy",): PrivacyConfig(), ("data", "non_members"): None,
    ("data", "public_duplicates"): "refuse", ("data", "test_fraction"): 0.2, ("data", "split_seed"): 0,
    ("audit", "canaries"): 0, ("audit", "canary_examples"): 0,
    ("preset_fallback",): None,
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["eval.samples=500", "params.lr=0.1"]` -> nested dict; values are read as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PrivbenchError(f"--set {item!r} is not key=value: write e.g. --set eval.samples=500")
        *parents, leaf = key.strip().split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PrivbenchError(f"--set {item!r} conflicts with another --set of {part!r}")
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return nested


def harness_presets() -> dict[str, Any]:
    return yaml.safe_load(resources.files("privbench").joinpath("presets.yaml").read_text())


def build(cls: type, data: Any, where: str = "") -> Any:
    """An instance of dataclass `cls` from plain data, checking keys and converting scalar types."""
    if not isinstance(data, dict):
        raise PrivbenchError(f"setting {where or cls.__name__!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
            raise PrivbenchError(f"unknown setting '{where}{key}'{hint}; valid here: {', '.join(names)}")
    optional = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    missing = [n for n in names if n not in data and n not in optional]
    if missing:
        raise PrivbenchError(f"setting '{where}{missing[0]}' is missing: give it in the preset or with --set")
    return cls(**{n: _convert(hints[n], data[n], f"{where}{n}") for n in names if n in data})


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where + ".")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # --set params.ntk_widths=800: a list of one
        if not isinstance(value, (list, tuple)):
            raise PrivbenchError(f"setting {where!r} must be a list, got {value!r}: e.g. --set {where}=1,2")
        return tuple(_convert(args[0], v, where) for v in value)
    if kind is Any:
        return value
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return kind(value) if kind is not int else int(float(value))
    except (TypeError, ValueError):
        raise PrivbenchError(f"setting {where!r} must be {kind.__name__}, got {value!r}") from None


def resolve(
    method: type, dataset: str, epsilon: float, seed: int, preset: str, device: str, overrides: dict[str, Any]
) -> RunConfig:
    """The full, validated configuration of one run."""
    from privbench.methods import preset_values

    _check_preset(preset)
    if "preset_fallback" in overrides:
        raise PrivbenchError("setting 'preset_fallback' records which preset entry stood in for the run's dataset and "
                             "epsilon, and cannot be set: drop --set preset_fallback")
    method_preset, fallback = preset_values(method, preset, dataset, epsilon)
    if fallback is not None:
        missing = dataset if fallback == preset else f"{dataset} at eps {epsilon:g}"
        log.warning("%s's %s preset has no entry for %s: the values of %s stand in (recorded as preset_fallback "
                    "in the run's config)", method.name, preset, missing, fallback)
    base = {
        **harness_presets()[preset],
        "method": method.name, "dataset": dataset, "public": None, "epsilon": epsilon,
        "seed": seed, "preset": preset, "device": device, "params": method_preset, "preset_fallback": fallback,
    }
    data = merge(base, overrides)
    params = build(method.Config, data.get("params"), "params.")
    config = build(RunConfig, {**data, "params": params})
    validate(config)
    return config


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from `to_dict()` output (a run directory's config.yaml), checked like a new one."""
    from privbench.methods import METHODS

    method = METHODS.get(data["method"])
    config = build(RunConfig, {**data, "params": build(method.Config, data["params"], "params.")})
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Every setting against its declared range (each part's `validate`), and the checks that need
    several settings at once or a registry: all before any data is read."""
    try:
        _validate(config)
    except SettingError as e:
        example = _preset_value(config, e.key)
        fix = f": e.g. --set {e.key}={shown(example)}" if example is not _NONE and e.rule.holds(example) else ""
        raise PrivbenchError(f"{e}{fix}") from None


def _validate(config: RunConfig) -> None:
    from privbench.methods import METHODS

    _check_preset(config.preset)
    if not config.epsilon > 0:
        raise PrivbenchError(f"epsilon must be > 0 (or inf for no privacy), got {config.epsilon:g}: pass e.g. --eps 1,10")
    if not 0 < config.delta < 1:
        raise PrivbenchError(f"delta must lie in (0, 1), got {config.delta:g}: use e.g. --set delta=1e-5")
    if config.accountant not in ("prv", "rdp"):
        raise PrivbenchError(f"unknown accountant {config.accountant!r}: use --set accountant=prv or rdp")
    if config.seed < 0:
        raise PrivbenchError(f"seed must be a non-negative integer, got {config.seed}: pass e.g. --seed 0")
    spec, _ = run_datasets(config, METHODS.get(config.method).uses_public)
    config.compute.validate("compute.")
    config.data.validate("data.")
    config.eval.validate("eval.")
    config.audit.validate("audit.")
    config.params.validate("params.")
    if check_resolution := getattr(config.params, "check_resolution", None):
        check_resolution(run_resolution(config, spec), "params.")
    if config.audit.with_canaries:
        method = METHODS.get(config.method)
        if not getattr(method, "trains_with_dp_sgd", False):
            dp_sgd = ", ".join(name for name in METHODS.names() if getattr(METHODS.get(name), "trains_with_dp_sgd", False))
            raise PrivbenchError(f"canaries audit a DP-SGD phase and {config.method} has none: audit one of {dp_sgd}")
        if math.isinf(config.epsilon):
            raise PrivbenchError("canaries audit a noisy mechanism and eps = inf adds no noise: pass e.g. --eps 1,10")


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise PrivbenchError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")


_NONE = object()  # a key the preset does not set


def _preset_value(config: RunConfig, key: str) -> Any:
    """The value of the dotted `key` in the run's preset, for its dataset and epsilon (_NONE if it has
    none), as `build` types it."""
    from privbench.methods import METHODS, preset_values

    params, _ = preset_values(METHODS.get(config.method), config.preset, config.dataset, config.epsilon)
    node: Any = {**harness_presets()[config.preset], "params": params}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _NONE
        node = node[part]
    return tuple(node) if isinstance(node, list) else node


def run_resolution(config: RunConfig, spec: DatasetSpec) -> int:
    """The side of the run's images: data.resolution, or the sensitive dataset's native one."""
    return config.data.resolution or spec.native_resolution


def sensitive_dataset(name: str) -> DatasetSpec:
    """The registry entry of a sensitive dataset (a run trains on one), or the error that says why not."""
    from privbench.data import DATASETS

    spec = DATASETS.get(name)
    if spec.role == "public":
        sensitive = [n for n in DATASETS.names() if DATASETS.get(n).role != "public"]
        raise PrivbenchError(f"{spec.name} is a public dataset: pass a sensitive one with --dataset ({', '.join(sensitive)})")
    return spec


def run_datasets(config: RunConfig, uses_public: bool) -> tuple[DatasetSpec, DatasetSpec | None]:
    """The registry entries of the run's sensitive set and of its public set (None when the method
    uses none). The roles are checked: pre-training on a sensitive set would use its images
    without noise and without accounting. A user's folder (role "either") takes the slot it fills."""
    from privbench.data import DATASETS

    spec = sensitive_dataset(config.dataset)
    public = DATASETS.get(config.public) if config.public is not None else None
    if public is not None and public.role == "sensitive":
        raise PrivbenchError(
            f"{public.name} is a sensitive dataset, not a public one: pre-training on it would use its images without "
            f"noise or accounting; pick a public set with --set public=NAME "
            f"({', '.join(n for n in DATASETS.names() if DATASETS.get(n).role != 'sensitive')})"
        )
    if not uses_public:
        return spec, None
    if public is None and spec.default_public is None:
        raise PrivbenchError(f"{spec.name} has no default public set: choose one with --set public=NAME")
    return spec, public or DATASETS.get(spec.default_public)
