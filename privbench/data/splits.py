"""The per-seed split of a sensitive train set into members, non-members and validation.

Members are the only images a method may train on; non-members (the same number, held out) are what
membership-inference attacks must tell members apart from; validation selects models for CA.
The split is saved with every run so that an audit can be repeated on exactly the same images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privbench.errors import PrivbenchError


@dataclass(frozen=True, eq=False)
class Split:
    """Sorted, read-only int64 indices into the train split; the three sets are disjoint."""

    members: np.ndarray
    non_members: np.ndarray
    validation: np.ndarray

    def __post_init__(self):
        for field in ("members", "non_members", "validation"):
            array = np.sort(np.asarray(getattr(self, field), dtype=np.int64).reshape(-1))
            array.flags.writeable = False
            object.__setattr__(self, field, array)
        everything = np.concatenate([self.members, self.non_members, self.validation])
        if len(np.unique(everything)) != len(everything):
            raise ValueError("split: members, non-members and validation must be disjoint")

    def __len__(self) -> int:
        return len(self.members) + len(self.non_members) + len(self.validation)

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k).tolist() for k in ("members", "non_members", "validation")})

    @classmethod
    def from_json(cls, text: str) -> "Split":
        try:
            data = json.loads(text)
            return cls(data["members"], data["non_members"], data["validation"])
        except (ValueError, KeyError, TypeError) as e:
            raise PrivbenchError(f"not a saved split ({e}): use the split.json that the run wrote") from e

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PrivbenchError(f"cannot read the split {path} ({e.strerror or e}): check the run directory") from e
        return cls.from_json(text)


def make_split(n_or_labels: int | np.ndarray, seed: int, validation_fraction: float = 0.1,
               non_members: int | None = None) -> Split:
    """Split `n` indices (or one per label, stratified by label) for one seed.

    Within each class a `validation_fraction` share (rounded) goes to validation. With `non_members`
    None the rest alternates between members and non-members, so both sides see every class equally
    often; when the remainder is odd overall, its last index joins validation, so members and
    non-members always have the same size and the three sets still cover every index. With
    `non_members` = k, k of the rest are held out as non-members (each class in proportion to its
    share, largest remainders first) and every other image is a member: the audit needs only k.
    """
    labels = np.zeros(n_or_labels, np.int64) if np.isscalar(n_or_labels) else np.asarray(n_or_labels).reshape(-1)
    if not 0 <= validation_fraction < 1:
        raise PrivbenchError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    _, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    validation, rest = [], []
    for start, count in zip(starts, counts):
        n_val = int(round(validation_fraction * count))
        validation.append(by_class[start : start + n_val])
        rest.append(by_class[start + n_val : start + count])
    if non_members is not None:
        return _held_out(rest, non_members, np.concatenate(validation), len(labels))
    rest = np.concatenate(rest) if rest else np.empty(0, np.int64)
    if len(rest) % 2:
        validation.append(rest[-1:])
        rest = rest[:-1]
    if len(rest) < 2:
        raise PrivbenchError(f"cannot split {len(labels)} images into members and non-members: use a larger train set")
    return Split(rest[0::2], rest[1::2], np.concatenate(validation))


def _held_out(rest: list[np.ndarray], non_members: int, validation: np.ndarray, n: int) -> Split:
    """`non_members` of the per-class shuffled `rest` held out in proportion to class size; members the rest."""
    sizes = np.array([len(r) for r in rest])
    if not 1 <= non_members < sizes.sum():
        raise PrivbenchError(f"cannot hold out {non_members} non-members of {n} images ({sizes.sum()} after validation): "
                             f"set data.non_members between 1 and {sizes.sum() - 1}")
    quota = non_members * sizes / sizes.sum()
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: non_members - take.sum()]] += 1
    return Split(np.concatenate([r[k:] for r, k in zip(rest, take)]), np.concatenate([r[:k] for r, k in zip(rest, take)]),
                 validation)
