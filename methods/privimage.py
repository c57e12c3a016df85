"""PrivImage (Li, Gong et al., USENIX Security 2024, arXiv 2311.12850): semantic-aware pre-training.

A classifier trained on the public set's labels (the semantic query function) names, for every
member, its top-k public classes; the counts per sensitive class form a semantic distribution that is
released once with Gaussian noise; for each sensitive class the most frequent public classes are
selected, and the diffusion model is pre-trained only on those public images before DP-SGD
fine-tuning on the members.

Steps 1-3 of the paper (query, private release, selection) live here; pre-training, DP-SGD
fine-tuning and sampling are the diffusion methods' shared pipeline (privbench.diffusion.pipeline).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from privbench.checks import POSITIVE, POSITIVE_INT, check_fields, one_of
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.data.transforms import to_model
from privbench.diffusion.pipeline import DiffusionMethod, PretrainedDiffusionConfig
from privbench.dp import Mechanism, PrivacyLedger, release_gaussian
from privbench.dp.distributed import current_world, from_rank0
from privbench.methods import METHODS
from privbench.metrics.accuracy import train_epochs
from privbench.nets.classifiers import CLASSIFIERS, build_classifier
from privbench.store import write_atomic, write_json


@dataclass(frozen=True)
class QueryConfig:
    classifier: str  # a privbench.nets.classifiers name, trained on the public labels
    epochs: int
    batch_size: int
    lr: float
    top_k: int  # public classes each member votes for (its L2 sensitivity is sqrt(top_k))
    sigma: float  # noise multiplier of the release: noise std = sigma * sqrt(top_k)
    classes_per_class: int  # public classes selected for each sensitive class

    def validate(self, where: str = "params.query.") -> None:
        check_fields(self, where, classifier=one_of(CLASSIFIERS, "classifiers"), epochs=POSITIVE_INT,
                     batch_size=POSITIVE_INT, lr=POSITIVE, top_k=POSITIVE_INT, sigma=POSITIVE, classes_per_class=POSITIVE_INT)


def query_classifier(public: ImageSet, config: QueryConfig, ctx: RunContext) -> nn.Module:
    """The semantic query function: a classifier of the public labels, trained on public data only.

    It never sees a member, so it costs no privacy; it is cached by the public set's content hash and
    the training settings, and reused by every run (any epsilon, any method) that asks again. Under
    torchrun every rank takes rank 0's view of the cache and only rank 0 writes it, as pre-training does.
    """
    settings = {k: v for k, v in asdict(config).items() if k in ("classifier", "epochs", "batch_size", "lr")}
    key = hashlib.sha256(json.dumps([public.content_hash(), settings, ctx.seed]).encode()).hexdigest()[:16]
    path = ctx.cache_dir / "privimage-query" / f"{key}.pt"
    if from_rank0(path.exists()):
        saved = torch.load(path, map_location=ctx.device, weights_only=False)
        model = build_classifier(config.classifier, public.channels, len(public.classes)).to(ctx.device)
        model.load_state_dict(saved["state"])
        ctx.costs.reused("query-classifier", saved["cost"])
        ctx.log.info("semantic query classifier reused from %s", path)
        return model.eval()
    with ctx.stage("query-classifier") as stage:
        *_, model = train_epochs(
            public, config.classifier, config.epochs, config.batch_size, config.lr,
            ctx.stage_seed("privimage-query"), ctx.device, ctx.progress,
        )
        stage.params = model
    if current_world().main:
        buffer = io.BytesIO()
        torch.save({"state": model.state_dict(), "cost": ctx.costs.records()[-1]}, buffer)
        write_atomic(path, buffer.getvalue())
    return model.eval()


@torch.no_grad()
def semantic_histogram(model: nn.Module, members: ImageSet, n_public: int, top_k: int, device: torch.device) -> torch.Tensor:
    """H[c, j] = how many members of sensitive class c have public class j among their top-k.

    Each member adds exactly top_k ones, all in its own row: adding or removing one member moves H
    by a vector of L2 norm sqrt(top_k), the sensitivity of the release.
    """
    counts = torch.zeros(len(members.classes), n_public, dtype=torch.float64)
    for start in range(0, len(members), 512):
        x = to_model(members.images[start : start + 512], device)
        top = model(x).topk(top_k, dim=1).indices.cpu()
        rows = torch.from_numpy(members.labels[start : start + 512]).repeat_interleave(top_k)
        counts.index_put_((rows, top.flatten()), torch.ones(len(rows), dtype=torch.float64), accumulate=True)
    return counts


def release_histogram(
    ledger: PrivacyLedger, histogram: torch.Tensor, config: QueryConfig, generator: torch.Generator
) -> torch.Tensor:
    """The noisy semantic distribution: one Gaussian release recorded in the ledger.

    sigma is a setting (the paper fixes it), not calibrated: the DP-SGD phase is then calibrated to
    whatever budget the query leaves. A sigma too small for the target is refused by the ledger.
    """
    mechanism = Mechanism("semantic-query", "gaussian", config.sigma, sensitivity=math.sqrt(config.top_k))
    return release_gaussian(ledger, mechanism, histogram, generator)


def select_public_classes(noisy: torch.Tensor, per_class: int) -> np.ndarray:
    """[sensitive classes, per_class] public class indices: for each sensitive class in turn, its
    most frequent public classes in the noisy histogram that no earlier class has taken."""
    n_sensitive, n_public = noisy.shape
    if n_sensitive * per_class > n_public:
        raise ValueError(f"cannot select {per_class} of {n_public} public classes for each of {n_sensitive} classes")
    taken: set[int] = set()
    selection = np.empty((n_sensitive, per_class), np.int64)
    for c in range(n_sensitive):
        ranked = [int(j) for j in torch.argsort(noisy[c], descending=True, stable=True) if int(j) not in taken]
        selection[c] = ranked[:per_class]
        taken.update(ranked[:per_class])
    return selection


def selected_public_set(public: ImageSet, selection: np.ndarray, classes: tuple[str, ...]) -> ImageSet:
    """The public images of the selected classes, relabelled to the sensitive class that chose them."""
    relabel = np.full(len(public.classes), -1, np.int64)
    for sensitive, chosen in enumerate(selection):
        relabel[chosen] = sensitive
    keep = np.flatnonzero(relabel[public.labels] >= 0)
    return ImageSet(public.images[keep], relabel[public.labels[keep]], classes, f"{public.name} selected by PrivImage")


@dataclass(frozen=True)
class PrivImageConfig(PretrainedDiffusionConfig):
    query: QueryConfig


@METHODS.register("privimage")
class PrivImage(DiffusionMethod):
    """Semantic query (one Gaussian release), pre-training on the selected public classes
    relabelled to the sensitive classes, DP-SGD fine-tuning, conditional sampling."""

    name = "privimage"
    Config = PrivImageConfig
    uses_public = True
    preset_files = ("diffusion", "privimage")

    def pretraining_set(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> tuple[ImageSet, bool]:
        q, public = self.config.query, task.public
        model = query_classifier(public, q, ctx)
        with ctx.stage("semantic-query"):
            histogram = semantic_histogram(model, task.members, len(public.classes), q.top_k, ctx.device)
            noisy = release_histogram(ledger, histogram, q, ctx.mechanism_generator("semantic-query"))
        # From here on only the noisy histogram is used (post-processing).
        selection = select_public_classes(noisy, q.classes_per_class)
        chosen = {sensitive: [public.classes[j] for j in row] for sensitive, row in zip(task.classes, selection)}
        write_json(ctx.run_dir / "selection.json", chosen)
        ctx.log.info("semantic query selected %s", "; ".join(f"{k}: {' '.join(v)}" for k, v in chosen.items()))
        return selected_public_set(public, selection, task.classes), True
