"""`camelyon`: Camelyon17-WILDS (Koh et al. 2021; Bandi et al. 2018), 96x96 patches of lymph-node
sections labelled normal or tumour, in the official WILDS release `camelyon17_v1.0/` (`metadata.csv`
and `patches/patient_<p>_node_<n>/patch_patient_<p>_node_<n>_x_<x>_y_<y>.png`). The splits are WILDS'
official ones: train = the patches of hospitals 0, 3 and 4 that WILDS marks train (split 0; its id_val
part, split 1, is left out), test = hospital 2. Patches are resized to the run's resolution (32 by
default, as DPImageBench uses them) and cached beside the data."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import decode_cropped, extract_tar, fetch_url, locate, open_tree
from privbench.errors import PrivbenchError

CLASSES = ("normal", "tumor")
METADATA = "metadata.csv"
URL = "https://worksheets.codalab.org/rest/bundles/0xe45e15f39fb54e9d9e919556af67aabe/contents/blob/"
ARCHIVE = "camelyon17_v1.0.tar.gz"  # 10.7 GB; WILDS publishes no checksum
TEST_CENTER, OOD_VAL_CENTER = "2", "1"
COLUMNS = ("patient", "node", "x_coord", "y_coord", "tumor", "center", "split")


def in_split(row: dict[str, str], split: str) -> bool:
    """WILDS' official split scheme: test is hospital 2; train the rest of split 0, without the
    out-of-distribution validation hospital 1."""
    if split == "test":
        return row["center"] == TEST_CENTER
    return row["split"] == "0" and row["center"] not in (TEST_CENTER, OOD_VAL_CENTER)


def patch(row: dict[str, str]) -> str:
    p, n, x, y = row["patient"], row["node"], row["x_coord"], row["y_coord"]
    return f"patches/patient_{p}_node_{n}/patch_patient_{p}_node_{n}_x_{x}_y_{y}.png"


def fetch(path: Path) -> None:
    extract_tar(fetch_url(URL, path / ARCHIVE, "camelyon"), path)


def read(split: str, path: Path, download: bool, resolution: int) -> ImageSet:
    with locate("camelyon", path, download, lambda p: open_tree(p, "patches"), fetch) as tree:
        if not tree.has(METADATA):
            raise PrivbenchError(f"{tree.where(METADATA)} is missing: put WILDS' metadata.csv beside patches/, or get "
                                 "camelyon17_v1.0 again")
        try:
            rows = list(csv.DictReader(io.StringIO(tree.read(METADATA).decode("utf-8"))))
            picked = [r for r in rows if in_split(r, split)]
            names = [patch(r) for r in picked]
            labels = np.array([int(r["tumor"]) for r in picked], np.int64)
        except (UnicodeDecodeError, csv.Error, KeyError, ValueError) as e:
            raise PrivbenchError(f"{tree.where(METADATA)} is not WILDS' Camelyon17 metadata ({type(e).__name__}: {e}); it "
                                 f"needs the columns {', '.join(COLUMNS)}: get camelyon17_v1.0 again") from e
        if not names:
            raise PrivbenchError(f"{tree.where(METADATA)} lists no {split} patches: get camelyon17_v1.0 again")
        if labels.min() < 0 or labels.max() > 1:
            raise PrivbenchError(f"{tree.where(METADATA)} has tumor values outside 0/1: get camelyon17_v1.0 again")
        pixels = decode_cropped(tree, names, resolution, 3, f"privbench-camelyon-{split}-{resolution}", f"camelyon/{split}")
    return ImageSet(pixels, labels, CLASSES, f"camelyon/{split}")


register(DatasetSpec(
    name="camelyon", role="sensitive",
    description="Camelyon17-WILDS: 96x96 lymph-node patches, normal or tumour; WILDS' official train and test hospitals",
    native_resolution=32, channels=3, splits=("train", "test"),
    where=f"WILDS' camelyon17_v1.0/ ({METADATA} and patches/), or its {ARCHIVE}, unpacked",
    read=read, default_public="tiny-imagenet", downloadable=True, fetch=fetch, direct_resolution=True,
))
