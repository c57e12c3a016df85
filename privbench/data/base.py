"""The image-set type every boundary speaks, and the dataset registry."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from privbench.errors import PrivbenchError
from privbench.registry import Registry


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 NHWC (C in {1, 3}) with int64 labels, the format at every boundary."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"{self.name}: images must be uint8 [N, H, W, C] with C in (1, 3), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 [N], got {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"{self.name}: labels must lie in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: np.ndarray, name: str | None = None) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices], self.classes, name or self.name)

    def content_hash(self) -> str:
        """A short digest of pixels, labels and class names: the key for caches of derived results."""
        h = hashlib.sha256()
        h.update(str((self.images.shape, self.classes)).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]


# "either": a user's own images, whose role is the slot of the run they fill (privbench.data.folder).
Role = Literal["sensitive", "public", "either"]


@dataclass(frozen=True)
class DatasetSpec:
    """What privbench knows about a dataset and how to read it from disk.

    `read(split, path, download, **options)` returns the split at the dataset's native resolution,
    or, for a `direct_resolution` dataset (one rendered, or cropped from large photographs), at the
    `resolution=R` it is also given; `privbench.data.load` resizes the rest. `path` is where the
    files are (see `where`), never None; `options` are the dataset's own keyword options.
    """

    name: str
    role: Role
    description: str
    native_resolution: int
    channels: int
    splits: tuple[str, ...]
    where: str  # one line: which files, in which layout, go where; shown in errors and `data list`
    read: Callable[..., ImageSet]
    default_public: str | None = None  # the public set a sensitive set pairs with by default
    downloadable: bool = False
    fetch: Callable[[Path], None] | None = None  # downloads the files into path; set iff downloadable
    embedded: bool = False  # ships with the install: needs no path and no download
    options: tuple[str, ...] = ()  # keyword options `read` accepts besides resolution
    direct_resolution: bool = False  # `read` takes resolution=R and produces R x R itself
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.downloadable != (self.fetch is not None):
            raise ValueError(f"dataset {self.name!r}: a downloadable dataset needs fetch, and only one may have it")


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def data_root() -> Path:
    """Where real datasets live: $PRIVBENCH_DATA, else ~/.cache/privbench/data."""
    return Path(os.environ.get("PRIVBENCH_DATA", Path.home() / ".cache" / "privbench" / "data"))


def missing(spec: DatasetSpec, path: Path) -> PrivbenchError:
    """The one-line error for a dataset whose files are not where they should be."""
    fix = f"put {spec.where} at {path}, or pass its location with --set data.path=PATH"
    if spec.downloadable:
        fix += f", or fetch it with `privbench data download {spec.name}`"
    return PrivbenchError(f"dataset {spec.name!r} not found at {path}: {fix}")
