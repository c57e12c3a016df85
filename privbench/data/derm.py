"""Dermatoscopic images of skin lesions in 7 diagnostic classes: `ham10000` (the official release,
600x450 photographs) and `dermamnist` (MedMNIST's 28x28 version of the same images)."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import check_array, check_labels, decode_cropped, fetch_url, locate, open_npz, open_tree
from privbench.errors import PrivbenchError

# HAM10000's dx codes; MedMNIST numbers the same diagnoses 0-6 in this order.
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA = "HAM10000_metadata.csv"
IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
TEST_BUCKETS = 5  # one lesion in five (by hash) is test


def is_test_lesion(lesion_id: str) -> bool:
    """The fixed held-out split: the release has no test set, and one lesion has several images, so
    whole lesions are split (none crosses train/test) by a hash of the id (about 20% test), which
    depends on nothing but the id: not on file order, a seed, or the release's size."""
    return int(hashlib.md5(lesion_id.encode()).hexdigest(), 16) % TEST_BUCKETS == 0


def read_ham(split: str, path: Path, download: bool, resolution: int) -> ImageSet:
    with locate("ham10000", path, download, lambda p: open_tree(p, IMAGE_FOLDERS[0])) as tree:
        if not tree.has(METADATA):
            raise PrivbenchError(f"{tree.where(METADATA)} is missing: put the official metadata csv beside {IMAGE_FOLDERS[0]}/")
        images = {
            n.rsplit("/", 1)[-1].rsplit(".", 1)[0]: n
            for folder in IMAGE_FOLDERS for n in tree.files(folder + "/") if n.lower().endswith(".jpg")
        }
        try:
            rows = list(csv.DictReader(io.StringIO(tree.read(METADATA).decode("utf-8-sig"))))
            picked = [r for r in rows if is_test_lesion(r["lesion_id"]) == (split == "test")]
            labels = np.array([CLASSES.index(r["dx"]) for r in picked], np.int64)
            names = [images[r["image_id"]] for r in picked]
        except (UnicodeDecodeError, csv.Error, KeyError, ValueError, TypeError) as e:
            raise PrivbenchError(
                f"{tree.where(METADATA)} does not match the images ({type(e).__name__}: {e}); it needs columns "
                f"lesion_id, image_id, dx in {', '.join(CLASSES)}, and one jpg per image_id: get HAM10000 again"
            ) from e
        if not names:
            raise PrivbenchError(f"{tree.where(METADATA)} lists no {split} images: get HAM10000 again")
        pixels = decode_cropped(tree, names, resolution, 3, f"privbench-ham10000-{split}-{resolution}", f"ham10000/{split}")
    return ImageSet(pixels, labels, CLASSES, f"ham10000/{split}")


register(DatasetSpec(
    name="ham10000", role="sensitive",
    description="HAM10000 dermatoscopic images, 7 diagnoses, centre-cropped; test = 1 lesion in 5 by id hash",
    native_resolution=64, channels=3, splits=("train", "test"),
    where=f"the official {METADATA} with {IMAGE_FOLDERS[0]}/ and {IMAGE_FOLDERS[1]}/ of <image_id>.jpg (Harvard Dataverse)",
    read=read_ham, default_public="imagenet64", direct_resolution=True,
))

DERMA_URL = "https://zenodo.org/records/10519652/files/dermamnist.npz?download=1"
DERMA_MD5 = "0744692d530f8e62ec473284d019b0c7"


def _npz(path: Path) -> Path:
    return path if path.suffix == ".npz" else path / "dermamnist.npz"


def fetch_derma(path: Path) -> None:
    fetch_url(DERMA_URL, _npz(path), "dermamnist", DERMA_MD5)


def read_derma(split: str, path: Path, download: bool) -> ImageSet:
    file = locate("dermamnist", path, download, lambda p: _npz(p) if _npz(p).is_file() else None, fetch_derma)
    with open_npz(file) as get:
        images = check_array(get(f"{split}_images"), (None, 28, 28, 3), f"{file} {split}_images")
        labels = check_array(get(f"{split}_labels"), (len(images), 1), f"{file} {split}_labels", dtype=None)
        labels = check_labels(labels, len(CLASSES), f"{file} {split}_labels")
    return ImageSet(images, labels, CLASSES, f"dermamnist/{split}")


register(DatasetSpec(
    name="dermamnist", role="sensitive", description="DermaMNIST (MedMNIST v2): HAM10000 at 28x28, 7 diagnoses",
    native_resolution=28, channels=3, splits=("train", "val", "test"),
    where="MedMNIST's dermamnist.npz (train|val|test_images, train|val|test_labels)",
    read=read_derma, default_public="imagenet32", downloadable=True, fetch=fetch_derma,
))
