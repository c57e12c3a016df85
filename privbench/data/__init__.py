"""Datasets by name: `load(name, split, resolution)` returns an `ImageSet` (uint8 NHWC, int64 labels).

Importing this package registers every dataset: the embedded `mnist` and `glyphs`, and the readers
of real releases on disk (cifar10, cifar100, fashion-mnist, eurosat, camelyon, celeba32/64, ham10000,
dermamnist, imagenet32/64, tiny-imagenet), a user's own `folder` of images, and `arrays` (what
privbench.fit is given).
"""

from privbench.data import (  # noqa: F401  (registers the datasets)
    arrays, camelyon, celeba, cifar, derm, eurosat, fashion, folder, glyphs, imagenet, mnist,
)
from privbench.data.api import download, load, verify
from privbench.data.base import DATASETS, DatasetSpec, ImageSet, data_root
from privbench.data.splits import Split, make_split

__all__ = ["DATASETS", "DatasetSpec", "ImageSet", "Split", "data_root", "download", "load", "make_split", "verify"]
