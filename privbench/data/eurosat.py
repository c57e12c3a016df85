"""`eurosat`: EuroSAT RGB (Helber et al. 2019), 27,000 64x64 Sentinel-2 patches of 10 land-use classes,
as the official EuroSAT.zip holds them (`2750/<class>/<class>_<n>.jpg`; Zenodo's EuroSAT_RGB.zip wraps
the same folders in `EuroSAT_RGB/`). The release has no test split: privbench takes DPImageBench's
(data/preprocess_dataset.py: torch.random_split of the ImageFolder, 23,000 train and 4,000 test, after
torch.manual_seed(0)), that is the permutation torch.randperm(27000) under seed 0 of the files in
ImageFolder order (class folders, then file names, sorted), its first 23,000 train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import IMAGE_SUFFIXES, Tree, decode_images, fetch_url, locate, open_tree
from privbench.errors import PrivbenchError

CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake")
# The official archive of madm.dfki.de, from the mirror torchvision fetches it from; the MD5 is the archive's.
URL = "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip"
MD5 = "c8fa014336c82ac7804f0398fcb19387"
ARCHIVE = "EuroSAT.zip"
TEST_SHARE = 4000 / 27000  # DPImageBench's 4,000 test images of the 27,000


def test_positions(n: int) -> np.ndarray:
    """Which of `n` files (in ImageFolder order) are test: the last round(n x 4000/27000) positions of
    torch.randperm(n) under seed 0, as torch.random_split takes them (exactly DPImageBench's at n = 27,000)."""
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    return np.sort(permutation[n - int(round(n * TEST_SHARE)):])


def _images(tree: Tree) -> list[str]:
    """Every image in `<class>/`, in ImageFolder order; a folder that is not a EuroSAT class is an error."""
    names = [n for n in tree.files() if n.lower().endswith(IMAGE_SUFFIXES)]
    for name in names:
        if name.count("/") != 1 or name.split("/")[0] not in CLASSES:
            raise PrivbenchError(f"{tree.where(name)} is not in a EuroSAT class folder ({', '.join(CLASSES[:3])}, ...): "
                                 "remove it, or get EuroSAT again")
    return names


def fetch(path: Path) -> None:
    fetch_url(URL, path / ARCHIVE, "eurosat", MD5)


def read(split: str, path: Path, download: bool) -> ImageSet:
    with locate("eurosat", path, download, lambda p: open_tree(p, CLASSES[0]), fetch) as tree:
        names = _images(tree)
        empty = [c for c in CLASSES if not any(n.startswith(c + "/") for n in names)]
        if empty:
            raise PrivbenchError(f"{tree.where(empty[0] + '/')} holds no images: get the complete EuroSAT release")
        test = np.zeros(len(names), bool)
        test[test_positions(len(names))] = True
        picked = np.flatnonzero(test if split == "test" else ~test)
        images = decode_images(tree, [names[i] for i in picked], 64, 3, desc=f"eurosat/{split}")
    labels = np.array([CLASSES.index(names[i].split("/")[0]) for i in picked], np.int64)
    return ImageSet(images, labels, CLASSES, f"eurosat/{split}")


register(DatasetSpec(
    name="eurosat", role="sensitive",
    description="EuroSAT RGB: 27,000 64x64 Sentinel-2 patches, 10 land-use classes; DPImageBench's 23,000/4,000 split",
    native_resolution=64, channels=3, splits=("train", "test"),
    where=f"the official {ARCHIVE} (2750/<class>/*.jpg) or Zenodo's EuroSAT_RGB.zip, zipped or unpacked",
    read=read, default_public="tiny-imagenet", downloadable=True, fetch=fetch,
))
