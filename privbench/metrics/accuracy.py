"""Classification accuracy (CA): train classifiers on synthetic images, select epochs on validation, test on real.

The protocol of DPImageBench (Chen et al. 2025, Section 4.2): each classifier of a set (ResNet, WRN
and ResNeXt at `paper`, lighter ones at `smoke`/`small`) trains on the synthetic set; after every
epoch it is scored on a held-out validation split of the real sensitive data; the state with the best
validation accuracy is scored on the real test split; CA is the mean (and standard deviation) over
the classifiers. Three selections are reported, each number labelled with the one it used:

- `validation`: the epoch of highest validation accuracy (earliest on ties). The headline CA.
- `noisy-validation`: report-noisy-max over the epochs' validation correct counts with Laplace noise
  of scale 1/epsilon_sel (Dwork and Roth 2014, Claim 3.9: epsilon_sel-DP for the validation split,
  whose counts have sensitivity 1 and move together). This is the selection a private pipeline may
  make; over k classifiers it costs k * epsilon_sel of the validation split (basic composition, which
  needs each classifier's noise drawn independently: `selection_noise`), which is recorded beside
  the number. The validation split is disjoint from the generator's members, so this is not part of
  the run's ledger.
- `oracle`: the best test accuracy over epochs. Choosing on the test split overestimates utility
  (DPImageBench's finding); it is an upper reference only, never the headline.

Selection reads only the validation counts; the test split is scored after every epoch only so that
any selection can be looked up afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from privbench.data.base import ImageSet
from privbench.data.transforms import to_model
from privbench.errors import PrivbenchError
from privbench.nets.classifiers import build_classifier

SELECTIONS = ("validation", "noisy-validation", "oracle")


@dataclass(frozen=True)
class ClassifierCurves:
    """One classifier trained on the synthetic set, scored after each epoch, and its selected epochs."""

    classifier: str
    parameters: int
    validation_correct: tuple[int, ...]  # correctly labelled validation images after each epoch
    validation_size: int
    test_accuracy: tuple[float, ...]  # after each epoch; read only at the selected epochs
    selected_epoch: dict[str, int]  # selection -> 1-based epoch
    # After each epoch, the accuracy on each class's test images (nan for a class without any).
    test_class_accuracy: tuple[tuple[float, ...], ...]

    def accuracy(self, selection: str) -> float:
        return self.test_accuracy[self.selected_epoch[selection] - 1]

    def class_accuracy(self, selection: str) -> tuple[float, ...]:
        return self.test_class_accuracy[self.selected_epoch[selection] - 1]

    def to_dict(self) -> dict:
        return {
            "classifier": self.classifier,
            "parameters": self.parameters,
            "validation_accuracy": [c / self.validation_size for c in self.validation_correct],
            "test_accuracy": list(self.test_accuracy),
            "selected_epoch": dict(self.selected_epoch),
            "accuracy": {s: self.accuracy(s) for s in SELECTIONS},
            "class_accuracy": {s: [_plain(a) for a in self.class_accuracy(s)] for s in SELECTIONS},
        }


def _plain(value: float) -> float | None:
    """JSON has no nan: a class without test images is null."""
    return None if np.isnan(value) else float(value)


@dataclass(frozen=True)
class AccuracyResult:
    """CA over a set of classifiers under each selection."""

    curves: tuple[ClassifierCurves, ...]
    selection_epsilon: float  # Laplace scale of the noisy selection is 1 / selection_epsilon

    def mean(self, selection: str = "validation") -> float:
        return float(np.mean([c.accuracy(selection) for c in self.curves]))

    def std(self, selection: str = "validation") -> float:
        """Population standard deviation over the classifiers, as DPImageBench reports it (np.std)."""
        return float(np.std([c.accuracy(selection) for c in self.curves]))

    def class_accuracy(self, selection: str = "validation") -> np.ndarray:
        """Per class, the mean over the classifiers of the accuracy on that class's test images."""
        return np.mean([c.class_accuracy(selection) for c in self.curves], axis=0)

    def detail(self, selection: str) -> dict:
        detail = {
            "selection": selection,
            "classifiers": [c.classifier for c in self.curves],
            "accuracy": [c.accuracy(selection) for c in self.curves],
            "std": self.std(selection),
        }
        if selection == "noisy-validation":
            detail["validation_epsilon"] = {
                "per_classifier": self.selection_epsilon,
                "total": self.selection_epsilon * len(self.curves),
                "laplace_scale": 1 / self.selection_epsilon,
            }
        if selection == "oracle":
            detail["warning"] = "selected on the test split: an upper reference, not a valid estimate"
        return detail

    def to_dict(self) -> dict:
        return {"selection_epsilon": self.selection_epsilon, "curves": [c.to_dict() for c in self.curves]}


def select_on_validation(correct: tuple[int, ...]) -> int:
    """The 1-based epoch with the most correct validation images, the earliest on ties."""
    return int(np.argmax(correct)) + 1


def select_noisy(correct: tuple[int, ...], epsilon: float, rng: np.random.Generator) -> int:
    """Report-noisy-max: the 1-based epoch maximising count + Laplace(1/epsilon); epsilon-DP on the validation split."""
    return int(np.argmax(np.asarray(correct, dtype=np.float64) + rng.laplace(0.0, 1 / epsilon, len(correct)))) + 1


def selection_noise(seed: int, classifiers: int) -> list[np.random.Generator]:
    """One noise stream per classifier for the noisy selection, independent of each other and fixed by
    the run seed. Shared noise would correlate the classifiers' selections, and k selections would then
    cost more than k * epsilon_sel."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence([seed, 0xCA]).spawn(classifiers)]


def correct_per_class(model: nn.Module, images: ImageSet, device: torch.device | str = "cpu", batch_size: int = 256) -> np.ndarray:
    """How many images of each class of `images` `model` labels correctly: [classes] counts."""
    model.eval()
    x, y = torch.from_numpy(images.images), torch.from_numpy(images.labels)
    correct = np.zeros(len(images.classes), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(to_model(x[start : start + batch_size], device))
            labels = y[start : start + batch_size]
            right = labels[logits.argmax(1).cpu() == labels].numpy()
            correct += np.bincount(right, minlength=len(images.classes))
    return correct


def _check(train: ImageSet, validation: ImageSet, test: ImageSet, epochs: int, batch_size: int) -> None:
    if epochs < 1 or batch_size < 1:
        raise PrivbenchError(f"CA needs epochs >= 1 and batch_size >= 1, got epochs={epochs}, batch_size={batch_size}")
    for s in (train, validation, test):
        if len(s) == 0:
            raise PrivbenchError(f"CA: image set {s.name!r} is empty")
    for s in (validation, test):
        if len(s.classes) != len(train.classes):
            raise PrivbenchError(
                f"CA: {s.name!r} has {len(s.classes)} classes but the training set {train.name!r} has "
                f"{len(train.classes)}; evaluate on the dataset the synthetic images imitate"
            )
        if (s.channels, s.resolution) != (train.channels, train.resolution):
            raise PrivbenchError(
                f"CA: {s.name!r} is {s.resolution}x{s.resolution}x{s.channels} but the training set "
                f"{train.name!r} is {train.resolution}x{train.resolution}x{train.channels}; "
                "load both at the same resolution and channels"
            )


def train_epochs(
    train: ImageSet,
    classifier: str = "cnn",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Iterator[nn.Module]:
    """Train `classifier` on `train` with Adam, yielding the model after every epoch.

    Deterministic on CPU for a given seed: the seed fixes the initialisation (without disturbing the
    caller's global RNG) and the shuffling order. No data augmentation. Callers decide what to do
    between epochs (CA scores validation; PrivImage's query classifier just trains on).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # the model is initialised on CPU, then moved
        model = build_classifier(classifier, train.channels, len(train.classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    for _ in tqdm(range(epochs), desc=f"{classifier} on {train.name}", unit="epoch", disable=None if progress else True):
        model.train()
        order = torch.randperm(len(train), generator=shuffle)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm cannot train on a single image; dropping one image per epoch is harmless
            loss = F.cross_entropy(model(to_model(x[idx], device)), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        yield model


def classifier_curves(
    train: ImageSet,
    validation: ImageSet,
    test: ImageSet,
    classifier: str,
    epochs: int,
    batch_size: int,
    lr: float,
    selection_epsilon: float,
    noise: np.random.Generator,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ClassifierCurves:
    """Train one classifier, score validation and test after each epoch, select epochs three ways (the
    noisy selection draws from `noise`, this classifier's own stream)."""
    validation_correct, test_correct = [], []
    model = None
    for model in train_epochs(train, classifier, epochs, batch_size, lr, seed, device, progress):
        validation_correct.append(int(correct_per_class(model, validation, device).sum()))
        test_correct.append(correct_per_class(model, test, device))
    test_accuracy = [float(c.sum() / len(test)) for c in test_correct]
    class_sizes = np.bincount(test.labels, minlength=len(test.classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        class_accuracy = [tuple(np.where(class_sizes > 0, c / class_sizes, np.nan)) for c in test_correct]
    # The selections below see the validation counts only; the oracle is the labelled exception.
    selected = {
        "validation": select_on_validation(tuple(validation_correct)),
        "noisy-validation": select_noisy(tuple(validation_correct), selection_epsilon, noise),
        "oracle": int(np.argmax(test_accuracy)) + 1,
    }
    return ClassifierCurves(
        classifier, sum(p.numel() for p in model.parameters()), tuple(validation_correct), len(validation),
        tuple(test_accuracy), selected, tuple(class_accuracy),
    )


def classification_accuracy(
    train: ImageSet,
    validation: ImageSet,
    test: ImageSet,
    classifiers: tuple[str, ...] = ("cnn",),
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    selection_epsilon: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> AccuracyResult:
    """Train each classifier on `train`, select epochs on `validation`, score the selections on `test`."""
    _check(train, validation, test, epochs, batch_size)
    if not selection_epsilon > 0:
        raise PrivbenchError(f"CA: the noisy selection's epsilon must be > 0, got {selection_epsilon:g}: set eval.ca_selection_epsilon")
    if not classifiers:
        raise PrivbenchError("CA needs at least one classifier: set eval.ca_classifiers, e.g. [cnn]")
    curves = tuple(
        classifier_curves(train, validation, test, name, epochs, batch_size, lr, selection_epsilon, noise, seed, device, progress)
        for name, noise in zip(classifiers, selection_noise(seed, len(classifiers)))
    )
    return AccuracyResult(curves, selection_epsilon)
