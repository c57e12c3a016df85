"""PrivImage's semantic query: its sensitivity, its one recorded release, and the selection it drives."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privbench.context import RunContext
from privbench.data import load, make_split
from privbench.data.base import ImageSet
from privbench.dp import PrivacyLedger
from privbench.methods.privimage import (
    QueryConfig, query_classifier, release_histogram, select_public_classes, selected_public_set, semantic_histogram,
)

CONFIG = QueryConfig(classifier="cnn", epochs=3, batch_size=128, lr=0.002, top_k=3, sigma=5.0, classes_per_class=3)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """MNIST members, the glyphs public set and a query classifier trained on glyphs (cached)."""
    ctx = RunContext(Path("."), tmp_path_factory.mktemp("cache"), torch.device("cpu"), 0, progress=False)
    train = load("mnist", "train")
    members = train.subset(make_split(train.labels, 0).members)
    public = load("glyphs", "train", size=62 * 80)
    return members, public, query_classifier(public, CONFIG, ctx), ctx


def test_each_member_adds_top_k_votes_to_its_own_row(embedded):
    members, public, model, ctx = embedded
    histogram = semantic_histogram(model, members, len(public.classes), CONFIG.top_k, ctx.device)
    expected_rows = CONFIG.top_k * np.bincount(members.labels, minlength=10)
    np.testing.assert_array_equal(histogram.sum(1).numpy(), expected_rows)
    without_one = semantic_histogram(model, members.subset(np.arange(1, len(members))), 62, CONFIG.top_k, ctx.device)
    assert (histogram - without_one).norm().item() == pytest.approx(math.sqrt(CONFIG.top_k))


def test_the_release_is_one_gaussian_in_the_ledger_with_the_noise_it_adds():
    ledger = PrivacyLedger(10.0, 1e-5)
    histogram = torch.zeros(10, 400, dtype=torch.float64)
    noisy = release_histogram(ledger, histogram, CONFIG, torch.Generator().manual_seed(0))
    (mechanism,) = ledger.mechanisms
    assert mechanism.name == "semantic-query" and mechanism.sensitivity == pytest.approx(math.sqrt(3))
    assert noisy.std().item() == pytest.approx(CONFIG.sigma * math.sqrt(CONFIG.top_k), rel=0.03)
    assert 0 < ledger.spent() < 10.0


def test_selection_is_greedy_per_class_and_disjoint():
    noisy = torch.tensor([[5.0, 4.0, 3.0, 0.0], [6.0, 1.0, 0.0, 2.0]])
    assert select_public_classes(noisy, 2).tolist() == [[0, 1], [3, 2]]
    with pytest.raises(ValueError):
        select_public_classes(noisy, 3)


def test_selected_public_images_take_the_sensitive_label():
    public = ImageSet(np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1), np.array([0, 1, 2, 3, 1]), tuple("abcd"), "p")
    chosen = selected_public_set(public, np.array([[3], [1]]), ("x", "y"))
    assert chosen.images.ravel().tolist() == [1, 3, 4]
    assert chosen.labels.tolist() == [1, 0, 1] and chosen.classes == ("x", "y")


def matches(model, members, public, ctx, sigma):
    """For how many digits the selection contains the glyph of that very digit."""
    config = QueryConfig(**{**CONFIG.__dict__, "sigma": sigma})
    histogram = semantic_histogram(model, members, len(public.classes), config.top_k, ctx.device)
    noisy = release_histogram(PrivacyLedger(math.inf, 1e-5), histogram, config, torch.Generator().manual_seed(1))
    selection = select_public_classes(noisy, config.classes_per_class)
    assert len(np.unique(selection)) == selection.size  # disjoint, whatever the noise
    return sum(public.classes.index(str(digit)) in selection[digit] for digit in range(10))


def test_the_query_selects_the_glyphs_of_the_members_digits(embedded):
    # Threshold 5 of 10 (measured with this 4,960-glyph public set: 5), ten times what chance gives
    # (the right glyph among 3 of 62 classes: 10 * 3/62 ~ 0.5 digits). matplotlib's fonts draw
    # 4 and 9 unlike handwriting (closed 4, Q-like 9), 0 and 1 share their shapes with O, l and I, and
    # the greedy disjoint selection lets an earlier digit take a letter a later one wanted.
    members, public, model, ctx = embedded
    assert matches(model, members, public, ctx, sigma=CONFIG.sigma) >= 5


def test_more_query_noise_degrades_the_selection_gracefully(embedded):
    members, public, model, ctx = embedded
    clean = matches(model, members, public, ctx, sigma=CONFIG.sigma)
    # sigma x 10: noise std ~ 87 against ~500 votes per digit row: the strongest classes survive.
    assert matches(model, members, public, ctx, sigma=CONFIG.sigma * 10) >= clean - 2
    # sigma x 1000: the noise (std ~ 8,700) swamps the votes; the selection is still valid, just
    # uninformed, near chance (~0.5 digits).
    assert matches(model, members, public, ctx, sigma=CONFIG.sigma * 1000) <= 2


def test_the_query_classifier_is_trained_once_and_reused(embedded, monkeypatch):
    members, public, model, ctx = embedded
    import privbench.methods.privimage as privimage

    monkeypatch.setattr(privimage, "train_epochs", lambda *a, **k: pytest.fail("the cached classifier was retrained"))
    again = query_classifier(public, CONFIG, ctx)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
