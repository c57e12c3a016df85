"""Classification accuracy (CA): train on synthetic images, select the epoch on validation, test once.

The protocol of DPImageBench: a classifier is trained on the synthetic set; after every epoch it is
scored on a validation split of real data; the state with the best validation accuracy (earliest on
ties) is then scored once on the real test set. Selecting on the test set would inflate CA, which is
why the test set is touched exactly once.
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
from privbench.errors import PrivbenchError
from privbench.nets.classifiers import build_classifier


@dataclass(frozen=True)
class AccuracyResult:
    classifier: str
    test_accuracy: float  # of the selected state
    selected_epoch: int  # 1-based: validation_accuracy[selected_epoch - 1] is the best
    validation_accuracy: tuple[float, ...]  # after each epoch
    parameters: int  # of the classifier, for the cost table

    def to_dict(self) -> dict:
        return {
            "classifier": self.classifier,
            "test_accuracy": self.test_accuracy,
            "selected_epoch": self.selected_epoch,
            "validation_accuracy": list(self.validation_accuracy),
            "parameters": self.parameters,
        }


def _to_model(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] on `device`."""
    return images.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def evaluate(model: nn.Module, images: ImageSet, device: torch.device | str = "cpu", batch_size: int = 256) -> float:
    """The fraction of `images` that `model` labels correctly."""
    model.eval()
    x, y = torch.from_numpy(images.images), torch.from_numpy(images.labels)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(_to_model(x[start : start + batch_size], torch.device(device)))
            correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
    return correct / len(images)


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
            loss = F.cross_entropy(model(_to_model(x[idx], device)), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        yield model


def classification_accuracy(
    train: ImageSet,
    validation: ImageSet,
    test: ImageSet,
    classifier: str = "cnn",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> AccuracyResult:
    """Train `classifier` on `train`, select the epoch on `validation`, score that state on `test`."""
    _check(train, validation, test, epochs, batch_size)
    curve: list[float] = []
    best_state: dict[str, torch.Tensor] = {}
    for model in train_epochs(train, classifier, epochs, batch_size, lr, seed, device, progress):
        curve.append(evaluate(model, validation, device))
        if curve[-1] > max(curve[:-1], default=-1.0):  # strictly better: ties keep the earliest epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model.load_state_dict(best_state)
    return AccuracyResult(
        classifier=classifier,
        test_accuracy=evaluate(model, test, device),
        selected_epoch=int(np.argmax(curve)) + 1,  # argmax returns the first maximum, matching the tie rule
        validation_accuracy=tuple(curve),
        parameters=sum(p.numel() for p in model.parameters()),
    )
