"""ImageFolder layouts (`<split>/<class>/<image>`), zipped or unpacked: the one reader behind every
dataset that ships as image files sorted into class folders (CIFAR-10 as JPEG, Tiny-ImageNet, ...)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from privbench.data.base import ImageSet
from privbench.data.files import IMAGE_SUFFIXES, Tree, decode_images
from privbench.errors import PrivbenchError


def class_folders(tree: Tree, folder: str) -> dict[str, list[str]]:
    """Image files under `folder/<class>/`, by class folder; images may sit deeper (`<class>/images/*`)."""
    found: dict[str, list[str]] = {}
    for name in tree.files(folder + "/"):
        parts = name.split("/")
        if len(parts) >= 3 and name.lower().endswith(IMAGE_SUFFIXES):
            found.setdefault(parts[1], []).append(name)
    return found


def read_labelled(
    tree: Tree, names: Sequence[str], labels: Sequence[int], classes: Sequence[str],
    resolution: int, channels: int, name: str,
) -> ImageSet:
    """Decode a listed split; an empty list is an error (a split is never silently empty)."""
    if not names:
        raise PrivbenchError(f"{name}: no images found in {tree.path}: check the layout of the files")
    images = decode_images(tree, names, resolution, channels, desc=name)
    return ImageSet(images, np.asarray(labels, np.int64), tuple(classes), name)


def read_imagefolder(
    tree: Tree, folder: str, folders: Sequence[str], resolution: int, channels: int, name: str,
    classes: Sequence[str] | None = None,
) -> ImageSet:
    """Read `folder/<class>/*` with labels in the order of `folders` (displayed as `classes` if given).

    A class folder that is not in `folders` (e.g. a test class missing from train) is an error:
    its label would be undefined.
    """
    found = class_folders(tree, folder)
    unknown = sorted(set(found) - set(folders))
    if unknown:
        raise PrivbenchError(
            f"{tree.where(f'{folder}/{unknown[0]}/')} is not a class of {name} "
            f"(expected only {', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}): remove it or fix the layout"
        )
    names = [n for f in folders for n in found.get(f, [])]
    labels = np.repeat(np.arange(len(folders)), [len(found.get(f, [])) for f in folders])
    return read_labelled(tree, names, labels, classes or folders, resolution, channels, name)
