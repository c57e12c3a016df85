"""`arrays`: the images a user hands to `privbench.fit` as numpy arrays. They have no files; the entry
exists so that such a fit resolves and validates its configuration (presets, overrides, roles) as a
run does, and records which data it trained on."""

from __future__ import annotations

from pathlib import Path

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.errors import PrivbenchError

NAME = "arrays"


def read_arrays(split: str, path: Path, download: bool) -> ImageSet:
    raise PrivbenchError(f"dataset {NAME!r} is the images passed to privbench.fit(method, images, labels, ...) and has no "
                         "files to read: call privbench.fit from Python")


register(DatasetSpec(
    name=NAME, role="sensitive", description="images passed to privbench.fit as arrays (all of them are members)",
    native_resolution=32, channels=3, splits=("train",), where="no files: numpy arrays passed to privbench.fit",
    read=read_arrays,
))
