"""`folder`: a user's own images, as the sensitive set (`--dataset folder --set data.path=DIR`) or as
the public set (`--set public=folder --set data.public_path=DIR`); its role is the slot it fills.

Three layouts, told apart by what the path is:
- a CSV file with a header row `file,label[,split]`: files relative to the CSV's folder, labels any
  names, split `train` or `test` (without the column, split as below);
- a directory or zip holding `train/<class>/...` and `test/<class>/...` (an ImageFolder with splits);
- a directory or zip holding `<class>/...`, split by the seeded rule `split_seed`/`test_fraction`
  (the run's `data.split_seed` and `data.test_fraction`, recorded with its configuration): within each
  class, in file-name order permuted by the seed, the first round(test_fraction x n) images are test
  (at least one where the class has two or more).

Images of any size are centre-cropped to a square and resized to the run's resolution; greyscale and
colour are converted to one mode, greyscale only when every image of the folder is (or to the
`channels` the sensitive set has, when the folder is the public set). Every bad folder ends in one
line naming the file and the fix, when the data is loaded: before anything trains.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import IMAGE_SUFFIXES, DirTree, Tree, ZipTree, decode_images, locate
from privbench.errors import PrivbenchError

NAME = "folder"
SPLITS = ("train", "test")
# The rule that splits a folder with no train/test of its own; DataConfig's defaults are these.
TEST_FRACTION, SPLIT_SEED = 0.2, 0
SUFFIXES = (*IMAGE_SUFFIXES, ".tif", ".tiff", ".gif")
GREYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
CSV_COLUMNS = ("file", "label", "split")


def _is_image(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _class_order(names: set[str]) -> tuple[str, ...]:
    """Class names sorted, numerically when every one is a number (so that 10 follows 9)."""
    if all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _find(path: Path) -> tuple[Tree, Path | None] | None:
    """The tree of images and, for the CSV layout, the CSV; None where nothing is."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return DirTree(path.parent), path
    if path.is_file() and path.suffix.lower() == ".zip":
        return ZipTree(path), None
    if path.is_dir():
        return DirTree(path), None
    return None


def _listed(tree: Tree, csv_path: Path) -> tuple[list[str], list[str], list[str] | None]:
    """The CSV's files, labels and (if it has the column) splits, every row checked."""
    try:
        rows = list(csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PrivbenchError(f"cannot read {csv_path} ({e}): save it as a UTF-8 CSV with a header row file,label[,split]") from e
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if header[:2] != ["file", "label"] or not set(header) <= set(CSV_COLUMNS) or len(set(header)) != len(header):
        raise PrivbenchError(f"{csv_path} must begin with the header row file,label or file,label,split, got "
                             f"{','.join(header) or 'nothing'}: add or fix that row")
    has_split = "split" in header
    files, labels, splits = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise PrivbenchError(f"{csv_path} line {line} has {len(row)} fields, the header {len(header)}: fix the row")
        cells = dict(zip(header, (cell.strip() for cell in row)))
        file = cells["file"].replace("\\", "/")
        if not file or not cells["label"]:
            empty = "file" if not file else "label"
            raise PrivbenchError(f"{csv_path} line {line} has an empty {empty}: fill it in or remove the row")
        if not tree.has(file):
            raise PrivbenchError(f"{csv_path} line {line} labels {file}, which is not at {tree.where(file)}: fix the path "
                                 f"(relative to the CSV's folder) or remove the row")
        if has_split and cells["split"].lower() not in SPLITS:
            raise PrivbenchError(f"{csv_path} line {line} has split {cells['split']!r}: write train or test")
        files.append(file)
        labels.append(cells["label"])
        splits.append(cells["split"].lower() if has_split else "")
    if not files:
        raise PrivbenchError(f"{csv_path} lists no images: add a row file,label per image")
    seen: dict[str, int] = {}
    for i, file in enumerate(files):
        if file in seen:
            raise PrivbenchError(f"{csv_path} lists {file} twice (lines {seen[file] + 2} and {i + 2}): keep one row per image")
        seen[file] = i
    unlabelled = next((n for n in tree.files() if _is_image(n) and n not in seen), None)
    if unlabelled is not None:
        raise PrivbenchError(f"{tree.where(unlabelled)} has no label in {csv_path}: add a row for it, or move it out of "
                             f"{csv_path.parent}")
    return files, labels, splits if has_split else None


def _by_folder(tree: Tree) -> tuple[list[str], list[str], list[str] | None]:
    """Files, class folder names and (for the train/test layout) splits of a folder of class folders."""
    images = [n for n in tree.files() if _is_image(n)]
    split_layout = any(n.split("/")[0] in SPLITS for n in images)
    depth = 2 if split_layout else 1  # folders above the class folder
    for name in images:
        parts = name.split("/")
        if len(parts) <= depth or (split_layout and parts[0] not in SPLITS):
            where = "train/<class>/ or test/<class>/" if split_layout else "<class>/"
            raise PrivbenchError(f"{tree.where(name)} is not in a class folder: move it into {where} under {tree.where('')}")
    classes = [n.split("/")[depth - 1] for n in images]
    splits = [n.split("/")[0] for n in images] if split_layout else None
    return images, classes, splits


def _seeded_split(labels: Sequence[str], test_fraction: float, split_seed: int) -> list[str]:
    """train or test for each image: per class, in the given (file name) order permuted by the seed,
    the first round(test_fraction x n) are test, at least one of a class with two or more."""
    if not 0 < test_fraction < 1:
        raise PrivbenchError(f"setting 'data.test_fraction' must lie in (0, 1), got {test_fraction}: "
                             "e.g. --set data.test_fraction=0.2")
    rng = np.random.default_rng(split_seed)
    out = ["train"] * len(labels)
    labels = np.asarray(labels)
    for name in _class_order(set(labels.tolist())):
        members = np.flatnonzero(labels == name)
        n_test = max(1, int(round(test_fraction * len(members)))) if len(members) >= 2 else 0
        for i in members[rng.permutation(len(members))[:n_test]]:
            out[i] = "test"
    return out


def _channels(tree: Tree, names: Sequence[str]) -> int:
    """1 when every image is greyscale, else 3; an image PIL cannot identify is an error here."""
    grey = True
    for name in names:
        try:
            with Image.open(io.BytesIO(tree.read(name))) as img:
                grey = grey and img.mode in GREYSCALE_MODES
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise PrivbenchError(f"cannot read image {tree.where(name)} ({e}): replace it with a readable image or remove it") from e
    return 1 if grey else 3


def read_folder(split: str, path: Path, download: bool, resolution: int, test_fraction: float = TEST_FRACTION,
                split_seed: int = SPLIT_SEED, channels: int | None = None) -> ImageSet:
    tree, csv_path = locate(NAME, path, download, _find)
    with tree:
        files, labels, splits = _listed(tree, csv_path) if csv_path is not None else _by_folder(tree)
        where = str(csv_path or tree.where(""))
        seeded = splits is None
        if seeded:
            splits = _seeded_split(labels, test_fraction, split_seed)
        train_classes = {c for c, s in zip(labels, splits) if s == "train"}
        if len(set(labels)) < 2:
            found = f"one class, {labels[0]}" if labels else "no images in class folders"
            raise PrivbenchError(f"{where} holds {found}: a class-conditional synthesizer needs two classes or more; "
                                 f"put each class's images in a folder of its own (<class>/...) or label them in a CSV")
        for name in SPLITS:
            if name in splits:
                continue
            if seeded:
                fix = "add images: a class needs two or more to give the test split one"
            elif csv_path is not None:
                fix = f"mark some rows {name} in the split column, or drop the column to let data.test_fraction split them"
            else:
                other = SPLITS[1 - SPLITS.index(name)]
                fix = (f"put {name}/<class>/... beside {other}/, or put the class folders at the top to let "
                       "data.test_fraction split them")
            raise PrivbenchError(f"{where}: the {name} split holds no images: {fix}")
        orphan = next((c for c, s in zip(labels, splits) if s == "test" and c not in train_classes), None)
        if orphan is not None:
            raise PrivbenchError(f"{where}: class {orphan} has test images but no train images: add train images of "
                                 f"{orphan} or remove its test images")
        classes = _class_order(train_classes)
        picked = [i for i, s in enumerate(splits) if s == split]
        names = [files[i] for i in picked]
        channels = channels or _channels(tree, files)
        images = decode_images(tree, names, resolution, channels, crop=True, desc=f"{NAME}/{split}")
    label_of = {name: i for i, name in enumerate(classes)}
    return ImageSet(images, np.array([label_of[labels[i]] for i in picked], np.int64), classes, f"{NAME}/{split}")


register(DatasetSpec(
    name=NAME, role="either",
    description="your own images: ImageFolder train|test/<class>/*, <class>/* (seeded split), or a file,label[,split] CSV",
    native_resolution=32, channels=3, splits=SPLITS,
    where="a folder (or zip) of <class>/* or train|test/<class>/* images, or a CSV file,label[,split]; "
          "as the public set pass it with --set data.public_path=PATH",
    read=read_folder, options=("test_fraction", "split_seed", "channels"), direct_resolution=True,
))
