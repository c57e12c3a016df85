"""The per-seed members / non-members / validation split of a sensitive train set."""

import numpy as np
import pytest

from privbench.data import Split, make_split
from privbench.errors import PrivbenchError

LABELS = np.repeat(np.arange(10), 101)  # odd class sizes exercise the rounding


def test_same_seed_same_split_and_different_seed_different():
    a, b, c = make_split(LABELS, 1), make_split(LABELS, 1), make_split(LABELS, 2)
    for field in ("members", "non_members", "validation"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.members, c.members)


@pytest.mark.parametrize("seed", [0, 7])
def test_disjoint_cover_balanced_and_stratified(seed):
    split = make_split(LABELS, seed, validation_fraction=0.1)
    everything = np.concatenate([split.members, split.non_members, split.validation])
    assert sorted(everything.tolist()) == list(range(len(LABELS))), "disjoint and covering"
    assert len(split.members) == len(split.non_members) == 455 and len(split.validation) == 100
    assert split.members.dtype == np.int64 and np.all(np.diff(split.members) > 0)
    members, non_members = np.bincount(LABELS[split.members]), np.bincount(LABELS[split.non_members])
    assert set(members.tolist()) <= {45, 46} and (members + non_members).tolist() == [91] * 10
    assert np.bincount(LABELS[split.validation]).tolist() == [10] * 10


def test_unlabelled_split_and_read_only_indices():
    split = make_split(11, seed=0, validation_fraction=0)
    assert len(split.members) == len(split.non_members) == 5 and len(split.validation) == 1
    with pytest.raises(ValueError):
        split.members[0] = 3


def test_save_load_round_trip(tmp_path):
    split = make_split(LABELS, 3)
    again = Split.load(split.save(tmp_path / "split.json"))
    for field in ("members", "non_members", "validation"):
        np.testing.assert_array_equal(getattr(again, field), getattr(split, field))


@pytest.mark.parametrize("text", ["{not json", '{"members": [1]}', '{"members": [1], "non_members": [1], "validation": []}'])
def test_corrupt_saved_split(tmp_path, text):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises((PrivbenchError, ValueError), match="saved split|disjoint"):
        Split.load(path)


def test_missing_saved_split_and_bad_arguments(tmp_path):
    with pytest.raises(PrivbenchError, match="cannot read the split"):
        Split.load(tmp_path / "none.json")
    with pytest.raises(PrivbenchError, match="validation_fraction"):
        make_split(LABELS, 0, validation_fraction=1.5)
    with pytest.raises(PrivbenchError, match="use a larger train set"):
        make_split(1, 0)


@pytest.mark.parametrize("seed", [0, 5])
def test_a_fixed_number_of_non_members_leaves_the_rest_to_members(seed):
    split = make_split(LABELS, seed, validation_fraction=0.1, non_members=137)
    everything = np.concatenate([split.members, split.non_members, split.validation])
    assert sorted(everything.tolist()) == list(range(len(LABELS))), "disjoint and covering"
    assert len(split.non_members) == 137 and len(split.members) == 910 - 137 and len(split.validation) == 100
    assert set(np.bincount(LABELS[split.non_members]).tolist()) <= {13, 14}, "stratified"
    assert np.bincount(LABELS[split.validation]).tolist() == [10] * 10, "validation as under the equal rule"
    again = make_split(LABELS, seed, validation_fraction=0.1, non_members=137)
    np.testing.assert_array_equal(split.members, again.members)


@pytest.mark.parametrize("count", [0, 910])
def test_an_impossible_number_of_non_members_is_refused(count):
    with pytest.raises(PrivbenchError, match="data.non_members between 1 and 909"):
        make_split(LABELS, 0, validation_fraction=0.1, non_members=count)


def test_the_cpu_preset_gives_members_most_of_the_train_set_and_the_audit_its_non_members():
    from privbench.config import resolve
    from privbench.data import load
    from privbench.methods import METHODS

    labels = load("mnist", "train").labels
    for name in METHODS.names():
        config = resolve(METHODS.get(name), "mnist", 10.0, 1, "cpu", "cpu", {})
        split = make_split(labels, config.seed, config.data.validation_fraction, config.data.non_members)
        assert (len(split.members), len(split.non_members), len(split.validation)) == (3100, 500, 400)
        assert config.audit.members <= len(split.non_members)
        assert np.array_equal(np.bincount(labels[split.members]), [310] * 10)
