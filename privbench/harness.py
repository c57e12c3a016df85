"""One run per (method, dataset, epsilon, seed): split, fit under the ledger, sample, evaluate, record.

Each stage leaves its result in the run directory together with its cost, so an interrupted run
resumes at the first missing stage. The fit checkpoint holds the ledger as well: a resumed run never
spends privacy budget again. (A fit killed half-way is redone from the start with the same seeded
noise, so the release it finally makes is the very one the ledger accounts for. With noise from the
OS, privacy.randomness: os, a redone fit would draw other noise, and what the killed one logged, e.g.
PrivImage's selection, would be a release no ledger accounts: such a run is refused, not redone.)
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from privbench.attacks.canaries import CanaryAudit, canary_metrics, canary_report
from privbench.capabilities import capabilities
from privbench.config import RunConfig, run_datasets, validate
from privbench.context import RunContext, Task
from privbench.data import DATASETS, DatasetSpec, ImageSet, Split, load, make_split
from privbench.data.overlap import screen_public
from privbench.dp import PrivacyLedger
from privbench.dp.distributed import World, from_rank0, init_from_env
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.metrics import CostRecorder, classification_accuracy, frechet, names
from privbench.metrics import inception_score as metrics_is
from privbench.metrics.dinov2 import extractor as dinov2_extractor
from privbench.metrics.fidelity import scores as fidelity_scores
from privbench.report import sample_grid
from privbench.runtime import resolve_device
from privbench.store import Store, commit_id, write_atomic, write_json, write_npz

log = logging.getLogger("privbench.run")


@dataclass(frozen=True)
class RunData:
    """Everything a run reads: the split train set, the test set, and the public set if needed."""

    train: ImageSet
    split: Split
    test: ImageSet
    public: ImageSet | None

    def subset(self, part: str) -> ImageSet:
        return self.train.subset(getattr(self.split, part), name=f"{self.train.name} {part}")

    def task(self) -> Task:
        """What a method may see: the members and the public set, never the other parts."""
        return Task(self.subset("members"), self.public, self.train.classes)


def run_context(config: RunConfig, run_dir: Path, store: Store, device: torch.device, costs: CostRecorder,
                progress: bool = False) -> RunContext:
    """The context every method call of a run gets (fit, restore, a replica's fit, a re-audit)."""
    return RunContext(run_dir, store.cache_dir, device, config.seed, progress=progress, log=log, costs=costs,
                      compute=config.compute, privacy=config.privacy)


def restore_fit(method: Any, run_dir: Path, task: Task, ctx: RunContext) -> tuple[Any, PrivacyLedger, list[dict]]:
    """The synthesizer, ledger and stage costs that a finished fit saved in `run_dir`/fit.pt."""
    saved = torch.load(run_dir / "fit.pt", map_location=ctx.device, weights_only=False)
    return method.restore(saved["state"], task, ctx), PrivacyLedger.from_dict(saved["ledger"]), saved["costs"]


def saved_samples(run_dir: Path, config: RunConfig, classes: tuple[str, ...]) -> tuple[ImageSet, dict]:
    """The samples a run drew, saved in `run_dir`/samples.npz, and the cost of drawing them."""
    with np.load(run_dir / "samples.npz") as saved:
        return ImageSet(saved["images"], saved["labels"], classes, f"{config.method} samples"), json.loads(str(saved["cost"]))


def load_data(
    config: RunConfig, method: type, cache_dir: Path | None = None, device: torch.device = torch.device("cpu")
) -> RunData:
    """The run's images; a public set that copies sensitive images is refused (the check runs on
    `device` and is cached in `cache_dir`, see privbench.data.overlap)."""
    spec, public_spec = run_datasets(config, method.uses_public)  # validated already; a guard for hand-built configs
    d = config.data
    train = load(spec.name, "train", d.resolution, d.path, **reader_options(spec, config))
    test = load(spec.name, "test", d.resolution, d.path, **reader_options(spec, config))
    split = enough_images(config, spec, train, test)
    public = None
    if public_spec is not None:
        public = load_public(config, public_spec.name, {"train": train, "test": test}, cache_dir, device)
    return RunData(train, split, test, public)


def load_public(config: RunConfig, name: str, sensitive: dict[str, ImageSet], cache_dir: Path | None,
                device: torch.device) -> ImageSet:
    """Public set `name` at the sensitive images' resolution, refused if its channels differ from
    theirs or if it copies any of them (privbench.data.overlap; or those copies dropped)."""
    d = config.data
    first = next(iter(sensitive.values()))
    spec = DATASETS.get(name)
    options = reader_options(spec, config) | ({"size": d.public_size} if d.public_size is not None else {})
    if "channels" in spec.options:
        options["channels"] = first.channels  # a user's folder, converted to the sensitive images' mode
    public = load(name, "train", first.resolution, d.public_path, **options)
    if public.channels != first.channels:
        raise PrivbenchError(f"public set {name} has {public.channels} channels, {config.dataset} has "
                             f"{first.channels}: pick a matching public set")
    return screen_public(config.dataset, sensitive, name, public, cache_dir, device, d.public_duplicates)


def reader_options(spec: DatasetSpec, config: RunConfig) -> dict[str, Any]:
    """The data settings that a dataset's reader takes as options: a user's folder, its split rule."""
    settings = {"test_fraction": config.data.test_fraction, "split_seed": config.data.split_seed}
    return {key: value for key, value in settings.items() if key in spec.options}


def enough_images(config: RunConfig, spec: DatasetSpec, train: ImageSet, test: ImageSet) -> Split:
    """The run's split of `train`, or one line saying which part the preset asks for is too small and
    what to do: a small dataset (a user's folder) fails here, before anything trains, not in evaluation."""
    d = config.data
    where = f"{spec.name} at {d.path}" if d.path is not None else spec.name
    try:
        split = make_split(train.labels, config.seed, d.validation_fraction, d.non_members)
    except PrivbenchError as e:
        raise PrivbenchError(f"{where}: {e}") from None
    if not len(split.validation):
        raise PrivbenchError(f"{where}: {len(train)} train images leave no validation image for CA at "
                             f"data.validation_fraction {d.validation_fraction:g}: add images, or raise e.g. "
                             f"--set data.validation_fraction={min(0.5, 2 * d.validation_fraction):g}")
    if len(test) <= config.eval.pr_k:
        raise PrivbenchError(f"{where}: the test split holds {len(test)} images, and precision and recall compare each "
                             f"with its {config.eval.pr_k} nearest: add test images (or with a seeded split raise "
                             f"--set data.test_fraction)")
    return split


@contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("privbench")
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def run(config: RunConfig, store: Store, progress: bool = True, audit: bool = True) -> dict[str, Any]:
    """Do one run (or nothing, if the database already has it) and return its database row.

    Everything that can be wrong with the input is checked before the run directory is created.
    With `audit`, membership-inference attacks score the fitted synthesizer (see `audit_run`).
    """
    world, device = init_from_env(resolve_device(config.device))
    if from_rank0(store.has(config.run_id)):
        log.info("%s is finished already: skipped", config.run_id)
        return _row(store, config.run_id)
    commit_id()  # read (and cached) now: the code this process runs, whatever is committed meanwhile
    method_cls = METHODS.get(config.method)
    data = load_data(config, method_cls, store.cache_dir, device)
    check_delta(config.delta, len(data.split.members))
    run_dir = store.run_dir(config.run_id)
    unfinished_fit = (run_dir / "log.txt").exists() and not (run_dir / "fit.pt").exists()
    if config.privacy.randomness == "os" and from_rank0(unfinished_fit):
        raise PrivbenchError(f"{config.run_id} began a fit with noise from the OS and never finished it; what it logged "
                             f"came from releases a new fit would not account for: delete {run_dir} to start over")
    if not world.main:
        _fit_replica(config, method_cls(config.params), data, device, store, run_dir, world)
        return {"run_id": config.run_id, "rank": world.rank}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=list)), sort_keys=False))
    _save_split(run_dir / "split.json", data.split)
    with _run_log(run_dir):
        log.info("run %s", config.run_id)
        _run(config, method_cls(config.params), data, device, store, run_dir, progress, audit, world)
    return _row(store, config.run_id)


def _fit_replica(config: RunConfig, method: Any, data: RunData, device: torch.device, store: Store, run_dir: Path,
                 world: World) -> None:
    """A data-parallel rank other than 0 (torchrun): the same fit as rank 0, writing nothing, then
    waiting for rank 0 to sample, evaluate and record (see privbench.dp.distributed)."""
    if not (run_dir / "fit.pt").exists():
        method.fit(data.task(), new_ledger(config), run_context(config, run_dir, store, device, CostRecorder()))
    log.debug("rank %d of %d: fit done, waiting for rank 0", world.rank, world.size)
    torch.distributed.barrier()


def check_delta(delta: float, members: int) -> None:
    """Refuse a delta that allows a mechanism to publish one of `members` members in the clear."""
    if delta >= 1 / members:
        raise PrivbenchError(
            f"delta {delta:g} is not below 1/{members} members: a mechanism could publish one member "
            f"in the clear; use e.g. --set delta={10 ** math.floor(math.log10(0.1 / members)):g}"
        )


def new_ledger(config: RunConfig) -> PrivacyLedger:
    return PrivacyLedger(config.epsilon, config.delta, config.accountant, randomness=config.privacy.randomness)


def _save_split(path: Path, split: Split) -> None:
    """Save the split, or check that a resumed run splits exactly as it did before."""
    if path.exists():
        if Split.load(path).to_json() != split.to_json():
            raise PrivbenchError(f"{path} differs from this run's split: the dataset changed since; use a new --out")
    else:
        write_atomic(path, split.to_json())


def _row(store: Store, run_id: str) -> dict[str, Any]:
    runs = store.runs()
    return runs[runs["run_id"] == run_id].iloc[0].to_dict()


def _run(
    config: RunConfig, method: Any, data: RunData, device: torch.device, store: Store, run_dir: Path, progress: bool,
    audit: bool, world: World,
) -> None:
    task = data.task()
    costs = CostRecorder()
    ctx = run_context(config, run_dir, store, device, costs, progress)
    if config.audit.with_canaries:
        ctx.canaries = CanaryAudit(config.audit.canaries, config.audit.canary_examples, len(task.classes),
                                   ctx.generator("canaries"))

    fit_path, canaries_path = run_dir / "fit.pt", run_dir / "canaries.json"
    if fit_path.exists():
        synthesizer, ledger, fit_costs = restore_fit(method, run_dir, task, ctx)
        accounted = ledger.to_dict()  # composes every mechanism (PRV can take seconds): once per run
        for record in fit_costs:
            costs.reused(record["name"], record)
        log.info("fit restored from %s; the ledger holds epsilon %.4g", fit_path, accounted["composed_epsilon"])
    else:
        ledger = new_ledger(config)
        # The method measures its own stages (query, pre-training, DP training) through ctx.stage.
        synthesizer = method.fit(task, ledger, ctx)
        accounted = ledger.to_dict()
        if ctx.canaries is not None:
            with costs.stage("canary-audit", device):
                # Written before fit.pt: a restored canary fit always finds what its canaries showed.
                write_npz(run_dir / "canary_readings.npz", **ctx.canaries.raw())
                write_json(canaries_path, canary_report(ctx.canaries, config.delta))
        buffer = io.BytesIO()
        torch.save({"state": synthesizer.state_dict(), "ledger": accounted, "costs": costs.records()}, buffer)
        write_atomic(fit_path, buffer.getvalue())
    write_json(run_dir / "ledger.json", accounted)
    epsilon, accountant = accounted["composed_epsilon"], accounted["composed_with"]

    if config.audit.with_canaries:
        # The canaries changed what was trained: the synthesizer is neither scored nor ranked.
        metrics = canary_metrics(json.loads(canaries_path.read_text()))
    else:
        metrics = _score(config, data, synthesizer, ctx, epsilon, audit)
    write_json(run_dir / "metrics.json", {name: {"value": v, "detail": d} for name, (v, d) in metrics.items()})
    write_json(run_dir / "costs.json", costs.to_dict())
    store.record(
        {
            "run_id": config.run_id, "method": config.method, "dataset": config.dataset, "preset": config.preset,
            "seed": config.seed, "target_epsilon": config.epsilon, "epsilon": epsilon, "delta": config.delta,
            "accountant": accountant, "config_hash": config.digest(),
            "config": json.dumps(config.to_dict(), default=list), "commit_id": commit_id(),
            "device": str(device) if world.size == 1 else f"{device.type} x{world.size}",
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_dir": str(run_dir),
        },
        metrics,
        costs.records(),
    )
    log.info("finished %s: epsilon %.4g (%s), %s", config.run_id, epsilon, accountant,
             ", ".join(f"{k} {v:.4g}" for k, (v, _) in metrics.items()))
    if world.size > 1:
        torch.distributed.barrier()  # the other ranks wait here before their next run's collectives


def _score(config: RunConfig, data: RunData, synthesizer: Any, ctx: RunContext, epsilon: float,
           audit: bool) -> dict[str, tuple[float, Any]]:
    """A synthesizer's metrics: its samples (drawn, or those a resumed run saved) evaluated, and audited
    with membership inference when `audit`."""
    run_dir, costs, device = ctx.run_dir, ctx.costs, ctx.device
    samples_path = run_dir / "samples.npz"
    if samples_path.exists():
        samples, sample_cost = saved_samples(run_dir, config, data.train.classes)
        costs.reused("sample", sample_cost)
    else:
        with costs.stage("sample", device) as stage:
            samples = synthesizer.sample(config.eval.samples, generator=ctx.generator("sample"))
            stage.params = synthesizer.parameters
        write_npz(samples_path, images=samples.images, labels=samples.labels, cost=np.array(json.dumps(costs.records()[-1])))
    write_atomic(run_dir / "samples.png", sample_grid(samples))

    metrics = evaluate(config, data, samples, ctx.cache_dir, run_dir, device, costs, ctx.progress)
    if audit:
        metrics |= audit_run(config, data, synthesizer, samples, epsilon, device, costs, run_dir)
    return metrics


def fid_reference(data: RunData, split: str, count: int | None) -> ImageSet:
    """The FID reference: the real test (or train) split, or a fixed subset of it (the same for every run)."""
    real = data.test if split == "test" else data.train
    return random_subset(real, count, 0, name=f"{real.name} (fid reference {count})")


def audit_subsets(config: RunConfig, data: RunData) -> tuple[ImageSet, ImageSet]:
    """The members and non-members the audit scores (all, or audit.members of each drawn with the run
    seed); memorisation is measured on them too."""
    members, non_members = data.subset("members"), data.subset("non_members")
    if (count := config.audit.members) is not None:
        rng = np.random.default_rng(config.seed)
        members = members.subset(np.sort(rng.permutation(len(members))[:count]))
        non_members = non_members.subset(np.sort(rng.permutation(len(non_members))[:count]))
    return members, non_members


def random_subset(images: ImageSet, count: int | None, seed: int, name: str | None = None) -> ImageSet:
    """At most `count` of `images` (all for None), drawn with `seed`, in their order."""
    if count is None or count >= len(images):
        return images
    return images.subset(np.sort(np.random.default_rng(seed).permutation(len(images))[:count]), name=name)


def evaluate(
    config: RunConfig, data: RunData, samples: ImageSet, cache_dir: Path, run_dir: Path, device: torch.device,
    costs: CostRecorder, progress: bool,
) -> dict[str, tuple[float, Any]]:
    """Fidelity (privbench.metrics.fidelity; IS where weights allow) and utility (CA under three
    selections, and per class)."""
    with costs.stage("fid", device):
        metrics = fidelity(config, data, samples, cache_dir, run_dir, device, progress)
    e = config.eval
    with costs.stage("ca", device) as stage:
        result = classification_accuracy(
            samples, data.subset("validation"), data.test, classifiers=e.ca_classifiers, epochs=e.ca_epochs,
            batch_size=e.ca_batch_size, lr=e.ca_lr, selection_epsilon=e.ca_selection_epsilon, seed=config.seed,
            device=device, progress=progress,
        )
        stage.params = sum(c.parameters for c in result.curves)
    metrics |= {
        "ca": (result.mean("validation"), result.detail("validation") | result.to_dict()),
        "ca_std": (result.std("validation"), {"over": "classifiers", "ddof": 0}),
        "ca_noisy": (result.mean("noisy-validation"), result.detail("noisy-validation")),
        "ca_oracle": (result.mean("oracle"), result.detail("oracle")),
    }
    test_sizes = np.bincount(data.test.labels, minlength=len(data.test.classes))
    for name, accuracy, size in zip(data.test.classes, result.class_accuracy("validation"), test_sizes):
        if size:
            metrics[names.per_class("ca", name)] = (float(accuracy), {"selection": "validation", "test_images": int(size)})
    return metrics


def fidelity(
    config: RunConfig, data: RunData, samples: ImageSet, cache_dir: Path, run_dir: Path, device: torch.device,
    progress: bool,
) -> dict[str, tuple[float, Any]]:
    """Every score of the first eval.fid_samples samples against the FID reference. Their features are
    kept in the run's folder, the reference's, members' and non-members' in the cache: scoring a run
    again computes no features."""
    e = config.eval
    reference = fid_reference(data, e.fid_reference_split, e.fid_reference)
    synthetic = samples.subset(np.arange(e.fid_samples))
    # Memorisation embeds the audit's members and non-members, each cut to as many images as the FID
    # reference holds: it costs what the reference costs (once per results folder: the cache keeps them).
    members, non_members = (random_subset(images, e.fid_reference, config.seed) for images in audit_subsets(config, data))

    def features(images: ImageSet, path: Path | None = None, extractor: frechet.FeatureExtractor = frechet.INCEPTION):
        if path is None:
            return frechet.reference_features(images, cache_dir, str(device), progress=progress, extractor=extractor)
        return frechet.cached_features(images, path, str(device), progress=progress, extractor=extractor)

    fake = features(synthetic, frechet.cache_path(synthetic, run_dir))
    real = features(reference)
    inception_score = metrics_is.inception_score(synthetic.images, str(device), progress=progress)
    if inception_score is None:
        log.info("Inception Score %s", metrics_is.UNAVAILABLE)
    detail = {"synthetic": e.fid_samples, "reference": len(reference), "reference_split": e.fid_reference_split,
              "inception_score": inception_score or metrics_is.UNAVAILABLE}
    metrics = fidelity_scores(fake, synthetic.labels, real, reference.labels, reference.classes, features(members),
                              features(non_members), e.pr_k, config.seed, device, detail)
    if (dinov2 := dinov2_extractor()) is not None:
        fake_dino = features(synthetic, frechet.cache_path(synthetic, run_dir, dinov2), dinov2)
        metrics[names.FD_DINOV2] = (frechet.fid_of_features(fake_dino, features(reference, extractor=dinov2)),
                                    detail | {"weights_sha1": dinov2.weights_sha1, "features": dinov2.dim})
    if inception_score is not None:
        metrics["is"] = (inception_score[0], {"std_over_splits": inception_score[1], "splits": 10})
    return metrics


def audit_run(
    config: RunConfig, data: RunData, synthesizer: Any, samples: ImageSet, epsilon: float, device: torch.device,
    costs: CostRecorder, run_dir: Path,
) -> dict[str, tuple[float, Any]]:
    """Score members against non-members with every attack that applies (or those configured).

    Per attack: TPR at 10% FPR with its bootstrap interval, AUC, and the empirical epsilon lower
    bound, all on the evaluation part; overall: the TPR and the lower bound of the attacks chosen on
    the calibration part (privbench.attacks.audit), so that the headline bound holds with 95%
    confidence. A lower bound above the ledger's epsilon means the accounting (or the code that spends
    it) is wrong: it is logged as an error and flagged in tables. Writes audit.json and a log-log ROC
    plot, roc.png.
    """
    from privbench.attacks import ATTACKS, Target, applies, missing
    from privbench.attacks.audit import choose_bound_attack, choose_tpr_attack, roc_plot, run_attack

    a = config.audit
    target = Target(synthesizer, samples, device)
    members, non_members = audit_subsets(config, data)
    attacks = [n for n in ATTACKS.names() if applies(ATTACKS.get(n), target)]
    if a.attacks is not None:
        if misfits := [n for n in a.attacks if n not in attacks]:
            lacks = "; ".join(f"attack {n} requires the capability {', '.join(sorted(missing(ATTACKS.get(n), target)))}"
                              for n in misfits)
            raise PrivbenchError(
                f"{lacks}, which method {config.method}'s synthesizer does not declare (it declares "
                f"{', '.join(sorted(capabilities(synthesizer))) or 'none'}): choose from {', '.join(attacks)}"
            )
        attacks = list(a.attacks)
    results, curves = {}, {}
    with costs.stage("audit", device):
        for name in attacks:
            attack = ATTACKS.get(name)()
            result, curves[name] = run_attack(
                attack, target, members, non_members, config.delta, calibration_fraction=a.calibration_fraction,
                resamples=a.resamples, seed=config.seed, spaces=a.spaces,
            )
            results[name] = result
            log.info("attack %s: TPR@10%%FPR %.3f [%.3f, %.3f], AUC %.3f, eps_lb %.3g", name, result.tpr[0.1],
                     *result.tpr_interval[0.1], result.auc, result.epsilon_lower_bound.epsilon)
    write_json(run_dir / "audit.json", {name: r.to_dict() for name, r in results.items()})
    write_atomic(run_dir / "roc.png", roc_plot(curves, f"{config.method}, eps {epsilon:.3g}"))
    tpr_attack, bound_attack = choose_tpr_attack(results.values()), choose_bound_attack(results.values())
    lower_bound = bound_attack.epsilon_lower_bound.epsilon
    failure = lower_bound > epsilon
    if failure:
        log.error("accounting failure: attack %s proves epsilon >= %.3g, above the ledger's %.3g",
                  bound_attack.attack, lower_bound, epsilon)
    metrics: dict[str, tuple[float, Any]] = {}
    for name, r in results.items():
        metrics[names.attack_tpr(name)] = (r.tpr[0.1], r.to_dict())
        metrics[names.attack_eps_lb(name)] = (r.epsilon_lower_bound.epsilon, vars(r.epsilon_lower_bound))
    low, high = tpr_attack.tpr_interval[0.1]
    metrics[names.TPR] = (tpr_attack.tpr[0.1], {"attack": tpr_attack.attack, "interval": [low, high],
                                                 "chosen_on": "calibration", "calibration_tpr": tpr_attack.calibration.tpr})
    metrics[names.TPR_LOW], metrics[names.TPR_HIGH] = (low, {}), (high, {})
    metrics[names.EPS_LB] = (lower_bound, {"attack": bound_attack.attack, "ledger_epsilon": epsilon, "accounting_failure": failure,
                                            "chosen_on": "calibration", "calibration_eps_lb": bound_attack.calibration.test.epsilon})
    return metrics


def reaudit(store: Store, run_id: str, attacks: list[str] | None, device: str = "auto") -> dict[str, tuple[float, Any]]:
    """Audit a finished run again (other attacks, a fixed attack) from its saved fit and samples;
    the run's audit metrics and audit cost in the database are replaced, nothing else changes."""
    run_dir, config, data = _finished_run(store, run_id)
    if attacks:
        config = dataclasses.replace(config, audit=dataclasses.replace(config.audit, attacks=tuple(attacks)))
        validate(config)
    method_cls = METHODS.get(config.method)
    device_ = resolve_device(device)
    costs = CostRecorder()
    task = data.task()
    synthesizer, ledger, _ = restore_fit(method_cls(config.params), run_dir, task, run_context(config, run_dir, store, device_, costs))
    samples, _ = saved_samples(run_dir, config, task.classes)
    with _run_log(run_dir):
        metrics = audit_run(config, data, synthesizer, samples, ledger.spent(), device_, costs, run_dir)
    _replace_metrics(store, run_id, metrics, costs.records()[-1], names.is_audit_metric)
    return metrics


def rescore(store: Store, run_id: str, device: str = "auto", progress: bool = True) -> dict[str, tuple[float, Any]]:
    """Score a finished run's saved samples again with every fidelity metric of this version (those
    added since the run included); the fidelity metrics it computes are replaced in the database and
    metrics.json, and its cost is recorded as the stage "rescore" (the run's own "fid" cost stays what
    scoring cost when it ran); nothing else changes (CA, which would retrain its classifiers, and the
    audit stay)."""
    run_dir, config, data = _finished_run(store, run_id)
    device_ = resolve_device(device)
    costs = CostRecorder()
    samples, _ = saved_samples(run_dir, config, data.train.classes)
    with _run_log(run_dir), costs.stage("rescore", device_):
        metrics = fidelity(config, data, samples, store.cache_dir, run_dir, device_, progress)
    _replace_metrics(store, run_id, metrics, costs.records()[-1], lambda name: False)
    return metrics


def _finished_run(store: Store, run_id: str) -> tuple[Path, RunConfig, RunData]:
    """A finished, scored run's folder, configuration and data (the same split, or an error)."""
    from privbench.config import from_dict

    if not store.has(run_id):
        raise PrivbenchError(f"no finished run {run_id!r} in {store.db_path}: see the run ids with `privbench table --format csv`")
    run_dir = store.run_dir(run_id)
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if config.audit.with_canaries:
        raise PrivbenchError(f"{run_id} is a canary run: its synthesizer was trained with canaries and never sampled; "
                             "its bounds are in its canaries.json")
    data = load_data(config, METHODS.get(config.method), store.cache_dir)
    _save_split(run_dir / "split.json", data.split)  # refuses if the dataset changed since the run
    return run_dir, config, data


def _replace_metrics(store: Store, run_id: str, metrics: dict[str, tuple[float, Any]], cost: dict[str, Any],
                     stale: Callable[[str], bool]) -> None:
    """`metrics` in place of the run's `stale` ones and those of the same names, in the database and metrics.json."""
    store.replace(run_id, metrics, cost, stale)
    path = store.run_dir(run_id) / "metrics.json"
    kept = {k: v for k, v in json.loads(path.read_text()).items() if not stale(k) and k not in metrics}
    write_json(path, kept | {name: {"value": v, "detail": d} for name, (v, d) in metrics.items()})
