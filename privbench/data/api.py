"""`load`, `verify` and `download`: every dataset by name, whatever its reader."""

from __future__ import annotations

from pathlib import Path

from privbench.data.base import DATASETS, DatasetSpec, ImageSet, data_root
from privbench.data.transforms import resize
from privbench.errors import PrivbenchError


def _path(spec: DatasetSpec, path: str | Path | None) -> Path:
    return data_root() / spec.name if path is None else Path(path).expanduser()


def load(
    name: str, split: str = "train", resolution: int | None = None, path: str | Path | None = None,
    download: bool = False, **options,
) -> ImageSet:
    """One split of a dataset as uint8 NHWC images at `resolution` (None: the native one).

    `path` defaults to data_root()/name and is ignored for embedded sets; `download` fetches a
    missing downloadable set first; `options` are the dataset's own (e.g. glyphs: size, seed).
    """
    spec = DATASETS.get(name)
    if split not in spec.splits:
        raise PrivbenchError(f"{spec.name} has no split {split!r}; choose one of: {', '.join(spec.splits)}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = ", ".join(spec.options) or "none"
        raise PrivbenchError(f"{spec.name} has no option {unknown[0]!r}; its options: {takes}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise PrivbenchError(f"resolution must be a positive number of pixels, got {resolution!r}")
    target = resolution or spec.native_resolution
    if spec.direct_resolution:
        options["resolution"] = target
    images = spec.read(split, _path(spec, path), download, **options)
    return ImageSet(resize(images.images, target), images.labels, images.classes, images.name)


def verify(name: str, path: str | Path | None = None) -> str:
    """Read every split in full and summarise it in one line, or raise the one-line error of what is wrong."""
    spec = DATASETS.get(name)
    sets = {split: load(spec.name, split, path=path) for split in spec.splits}
    first = next(iter(sets.values()))
    for split, images in sets.items():
        if images.classes != first.classes:
            raise PrivbenchError(f"{spec.name}: the {split} split has other classes than {spec.splits[0]}: get the dataset again")
    counts = ", ".join(f"{split} {len(images)}" for split, images in sets.items())
    r, c = first.resolution, first.channels
    return f"{spec.name}: {counts} images, {r}x{r}x{c}, {len(first.classes)} classes, ok"


def download(name: str, path: str | Path | None = None) -> Path:
    """Fetch a downloadable dataset into `path` (default data_root()/name) and return where it is."""
    spec = DATASETS.get(name)
    if spec.embedded:
        raise PrivbenchError(f"{spec.name} ships with privbench: there is nothing to download")
    target = _path(spec, path)
    if not spec.downloadable:
        raise PrivbenchError(f"{spec.name} cannot be downloaded by privbench: put {spec.where} at {target}")
    spec.fetch(target)
    return target
