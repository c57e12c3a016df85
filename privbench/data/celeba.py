"""`celeba32`, `celeba64`: aligned CelebA faces labelled by the `Male` attribute, in torchvision's
layout (`celeba/img_align_celeba/*.jpg`, `list_attr_celeba.txt`, `list_eval_partition.txt`).

Each 178x218 photograph is centre-cropped to a square and resized, as DPDM and DPImageBench do.
Decoding 200k JPEGs takes minutes, so the arrays are cached beside the data (see `decode_cropped`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import Tree, decode_cropped, locate, open_tree
from privbench.errors import PrivbenchError

CLASSES = ("female", "male")
SPLITS = {"train": "0", "val": "1", "test": "2"}  # the codes of list_eval_partition.txt
IMAGES = "img_align_celeba"
ATTRIBUTES, PARTITION = "list_attr_celeba.txt", "list_eval_partition.txt"
FIX = "get the CelebA annotation files again"


def _text(tree: Tree, name: str) -> tuple[str, list[str]]:
    """Where a CelebA text file is (beside the images, or in the official Anno/ or Eval/) and its lines."""
    for candidate in (name, f"Anno/{name}", f"Eval/{name}"):
        if tree.has(candidate):
            try:
                return tree.where(candidate), tree.read(candidate).decode("ascii").splitlines()
            except UnicodeDecodeError as e:
                raise PrivbenchError(f"{tree.where(candidate)} is not text ({e}): {FIX}") from e
    raise PrivbenchError(f"{tree.where(name)} is missing: put {ATTRIBUTES} and {PARTITION} beside {IMAGES}/")


def parse_male(where: str, lines: list[str]) -> dict[str, int]:
    """File name -> 1 if `Male` else 0, from list_attr_celeba.txt (count, 40 names, then `file  -1  1 ...`)."""
    try:
        count, names = int(lines[0]), lines[1].split()
        column = names.index("Male") + 1
        rows = [line.split() for line in lines[2:] if line.strip()]
        bad = next((i for i, r in enumerate(rows) if len(r) != len(names) + 1 or r[column] not in ("1", "-1")), None)
        if bad is not None:
            raise ValueError(f"line {bad + 3} does not hold a file name and {len(names)} values of +-1")
        if len(rows) != count:
            raise ValueError(f"it announces {count} rows but has {len(rows)}")
    except (IndexError, ValueError) as e:
        raise PrivbenchError(f"{where} is not a CelebA attribute file ({e}): {FIX}") from e
    return {r[0]: int(r[column] == "1") for r in rows}


def read_celeba(split: str, path: Path, download: bool, resolution: int) -> ImageSet:
    name = f"celeba{resolution}"
    with locate(name, path, download, lambda p: open_tree(p, IMAGES)) as tree:
        male = parse_male(*_text(tree, ATTRIBUTES))
        where, lines = _text(tree, PARTITION)
        rows = [line.split() for line in lines if line.strip()]
        bad = next((i for i, r in enumerate(rows) if len(r) != 2 or r[1] not in SPLITS.values() or r[0] not in male), None)
        if bad is not None:
            raise PrivbenchError(f"{where} line {bad + 1} is not `<file in {ATTRIBUTES}> 0|1|2`: {FIX}")
        files = [f for f, code in rows if code == SPLITS[split]]
        if not files:
            raise PrivbenchError(f"{where} lists no {split} images: {FIX}")
        images = decode_cropped(
            tree, [f"{IMAGES}/{f}" for f in files], resolution, 3, f"privbench-{name}-{split}", f"{name}/{split}"
        )
        labels = np.array([male[f] for f in files], np.int64)
    return ImageSet(images, labels, CLASSES, f"{name}/{split}")


for _r in (32, 64):
    register(DatasetSpec(
        name=f"celeba{_r}", role="sensitive",
        description=f"CelebA aligned faces, centre-cropped to {_r}x{_r}, labelled female/male",
        native_resolution=_r, channels=3, splits=("train", "val", "test"),
        where=(f"torchvision's CelebA layout (celeba/{IMAGES}/*.jpg, celeba/{ATTRIBUTES}, celeba/{PARTITION}; "
               "from the CelebA Google Drive, which allows no scripted download)"),
        read=partial(read_celeba, resolution=_r), default_public=f"imagenet{_r}",
    ))
