"""`cifar10`: the official python pickles (`cifar-10-batches-py`, what torchvision downloads), or any
ImageFolder zip or directory `train|test/<class>/*` (such as the JPEG development copy); `cifar100`:
its official python pickles (`cifar-100-python`), labelled with the 100 fine classes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import check_array, check_labels, extract_tar, fetch_url, locate, open_tree
from privbench.data.imagefolder import read_imagefolder
from privbench.errors import PrivbenchError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
FOLDER = "cifar-10-batches-py"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of lists and numpy arrays and nothing else: a pickle can run arbitrary code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def unpickle(path: Path, release: str = "CIFAR-10") -> dict:
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise PrivbenchError(f"cannot read {path} ({e}): it is truncated or corrupt, download {release} again") from e
    if not isinstance(data, dict):
        raise PrivbenchError(f"{path} holds a {type(data).__name__}, not a {release} batch: download {release} again")
    return data


def _entry(data: dict, key: bytes, path: Path, release: str = "CIFAR-10"):
    if key not in data:
        raise PrivbenchError(f"{path} has no {key.decode()!r} entry: is it a {release} python batch? download {release} again")
    return data[key]


def _pixels(data: dict, path: Path, release: str, labels_key: bytes, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images as uint8 NHWC and its labels, checked."""
    pixels = check_array(np.asarray(_entry(data, b"data", path, release)), (None, 3 * 32 * 32), f"{path} data")
    labels = np.asarray(_entry(data, labels_key, path, release))
    if labels.shape != (len(pixels),):
        raise PrivbenchError(f"{path} has {labels.size} labels for {len(pixels)} images: download {release} again")
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW-flattened
    return images, check_labels(labels, n_classes, f"{path} labels")


def read_pickles(folder: Path, split: str) -> ImageSet:
    """Every batch of `split` from an unpacked `cifar-10-batches-py`; a missing batch is an error."""
    meta = folder / "batches.meta"
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _entry(unpickle(meta), b"label_names", meta))
    if classes != CLASSES:
        raise PrivbenchError(f"{meta} names the classes {classes}, not CIFAR-10's: download CIFAR-10 again")
    images, labels = [], []
    for batch in BATCHES[split]:
        path = folder / batch
        if not path.is_file():
            raise PrivbenchError(f"{path} is missing: put all of {FOLDER} (data_batch_1..5, test_batch, batches.meta) in {folder}")
        batch_images, batch_labels = _pixels(unpickle(path), path, "CIFAR-10", b"labels", len(CLASSES))
        images.append(batch_images)
        labels.append(batch_labels)
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), CLASSES, f"cifar10/{split}")


def _find(path: Path):
    """The pickle folder, else an ImageFolder tree, else None."""
    for folder in (path / FOLDER, path):
        if (folder / "batches.meta").is_file():
            return folder
    return open_tree(path, "train")


def fetch(path: Path) -> None:
    extract_tar(fetch_url(URL, path / "cifar-10-python.tar.gz", "cifar10", MD5), path)


def read(split: str, path: Path, download: bool) -> ImageSet:
    found = locate("cifar10", path, download, _find, fetch)
    if isinstance(found, Path):
        return read_pickles(found, split)
    with found as tree:
        return read_imagefolder(tree, split, CLASSES, 32, 3, f"cifar10/{split}")


SPEC = register(DatasetSpec(
    name="cifar10", role="sensitive", description="CIFAR-10: 60,000 32x32 colour images in 10 classes",
    native_resolution=32, channels=3, splits=("train", "test"),
    where=f"{FOLDER}/ (data_batch_1..5, test_batch, batches.meta) or an ImageFolder zip/folder train|test/<class>/*.jpg|png",
    read=read, default_public="tiny-imagenet", downloadable=True, fetch=fetch,
))


URL_100 = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5_100 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER_100 = "cifar-100-python"


def _find_100(path: Path) -> Path | None:
    for folder in (path / FOLDER_100, path):
        if (folder / "meta").is_file():
            return folder
    return None


def fetch_100(path: Path) -> None:
    extract_tar(fetch_url(URL_100, path / "cifar-100-python.tar.gz", "cifar100", MD5_100), path)


def read_100(split: str, path: Path, download: bool) -> ImageSet:
    """The `train` or `test` pickle of an unpacked `cifar-100-python`, with its fine labels."""
    folder = locate("cifar100", path, download, _find_100, fetch_100)
    meta = folder / "meta"
    names = _entry(unpickle(meta, "CIFAR-100"), b"fine_label_names", meta, "CIFAR-100")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(classes) != 100:
        raise PrivbenchError(f"{meta} names {len(classes)} fine classes, not CIFAR-100's 100: download CIFAR-100 again")
    batch = folder / split
    if not batch.is_file():
        raise PrivbenchError(f"{batch} is missing: put all of {FOLDER_100} (train, test, meta) in {folder}")
    images, labels = _pixels(unpickle(batch, "CIFAR-100"), batch, "CIFAR-100", b"fine_labels", len(classes))
    return ImageSet(np.ascontiguousarray(images), labels, classes, f"cifar100/{split}")


register(DatasetSpec(
    name="cifar100", role="sensitive", description="CIFAR-100: 60,000 32x32 colour images in 100 fine classes",
    native_resolution=32, channels=3, splits=("train", "test"),
    where=f"{FOLDER_100}/ (train, test, meta), as the official cifar-100-python.tar.gz unpacks",
    read=read_100, default_public="tiny-imagenet", downloadable=True, fetch=fetch_100,
))
