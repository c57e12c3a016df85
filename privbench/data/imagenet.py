"""Public pre-training sets: the official downsampled ImageNet (`imagenet32`, `imagenet64`) and
`tiny-imagenet` (64x64, 200 classes), the ImageNet stand-in that can be downloaded or shipped."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import check_array, check_labels, fetch_url, locate, open_npz, open_tree
from privbench.data.imagefolder import class_folders, read_imagefolder, read_labelled
from privbench.errors import PrivbenchError

# The downsampled ImageNet labels are the 1-based indices of its map_clsloc.txt: class i is named
# by its file label i + 1, so that a class name looks up directly in that map.
IMAGENET_CLASSES = tuple(str(i) for i in range(1, 1001))
TRAIN_BATCHES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))


def _batch_files(split: str, resolution: int, path: Path) -> list[Path] | None:
    """The split's npz files in `path` or one folder down (Imagenet32_train_npz/, ...), or None if none are."""
    names = TRAIN_BATCHES if split == "train" else ("val_data.npz",)
    found = {}
    for name in names:
        hits = sorted(p for p in (path / name, *path.glob(f"*/{name}")) if p.is_file())
        if hits:
            found[name] = hits[0]
    if not found:
        return None
    absent = [n for n in names if n not in found]
    if absent:
        raise PrivbenchError(
            f"{absent[0]} is missing from {path}: put all of Imagenet{resolution}_{split}_npz "
            f"({names[0]}..{names[-1]}) there"
        )
    return [found[n] for n in names]


def read_imagenet(split: str, path: Path, download: bool, resolution: int) -> ImageSet:
    name = f"imagenet{resolution}"
    files = locate(name, path, download, partial(_batch_files, split, resolution))
    labels = []
    for file in files:  # labels first, so that the pixels go straight into one preallocated array
        with open_npz(file) as get:
            labels.append(check_labels(get("labels"), 1000, f"{file} labels", offset=1))
    images = np.empty((sum(map(len, labels)), resolution, resolution, 3), np.uint8)
    start = 0
    for file, batch_labels in zip(files, labels):
        with open_npz(file) as get:
            data = check_array(get("data"), (len(batch_labels), 3 * resolution * resolution), f"{file} data")
        images[start : start + len(data)] = data.reshape(-1, 3, resolution, resolution).transpose(0, 2, 3, 1)
        start += len(data)
    return ImageSet(images, np.concatenate(labels), IMAGENET_CLASSES, f"{name}/{split}")


for _r in (32, 64):
    register(DatasetSpec(
        name=f"imagenet{_r}", role="public",
        description=f"ImageNet downsampled to {_r}x{_r} (Chrabaszcz et al. 2017): 1.28M train, 50k val, 1000 classes",
        native_resolution=_r, channels=3, splits=("train", "val"),
        where=(f"the official npz batches (Imagenet{_r}_train_npz/train_data_batch_1..10.npz, "
               f"Imagenet{_r}_val_npz/val_data.npz; from image-net.org, login required)"),
        read=partial(read_imagenet, resolution=_r),
    ))

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
VAL_ANNOTATIONS = "val/val_annotations.txt"


def fetch_tiny(path: Path) -> None:
    fetch_url(TINY_URL, path / "tiny-imagenet-200.zip", "tiny-imagenet", TINY_MD5)


def _read_official_val(tree, wnids: list[str], name: str) -> ImageSet:
    """The official val layout: every image in val/images/, its wnid in val_annotations.txt."""
    index = {w: i for i, w in enumerate(wnids)}
    names, labels = [], []
    for n, line in enumerate(tree.read(VAL_ANNOTATIONS).decode().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index or not tree.has(f"val/images/{fields[0]}"):
            raise PrivbenchError(
                f"{tree.where(VAL_ANNOTATIONS)} line {n} names no image of a known class: get tiny-imagenet-200 again"
            )
        names.append(f"val/images/{fields[0]}")
        labels.append(index[fields[1]])
    return read_labelled(tree, names, labels, wnids, 64, 3, name)


def read_tiny(split: str, path: Path, download: bool) -> ImageSet:
    """Classes are the sorted wnids (of wnids.txt when present), labels index them; greyscale becomes RGB."""
    name = f"tiny-imagenet/{split}"
    with locate("tiny-imagenet", path, download, lambda p: open_tree(p, "train"), fetch_tiny) as tree:
        wnids = sorted(tree.read("wnids.txt").decode().split() if tree.has("wnids.txt") else class_folders(tree, "train"))
        if split == "val" and tree.has(VAL_ANNOTATIONS):
            return _read_official_val(tree, wnids, name)
        return read_imagefolder(tree, split, wnids, 64, 3, name)


TINY = register(DatasetSpec(
    name="tiny-imagenet", role="public", description="Tiny-ImageNet: 64x64 ImageNet images of 200 classes",
    native_resolution=64, channels=3, splits=("train", "val"),
    where=("tiny-imagenet-200.zip or its contents (train/<wnid>/images/*.JPEG, val/images/* with "
           "val/val_annotations.txt, wnids.txt), or an ImageFolder zip/folder train|val/<wnid>/*.JPEG"),
    read=read_tiny, downloadable=True, fetch=fetch_tiny,
))
