"""File access every reader shares: a zip or a directory seen as one tree, parallel image decoding,
checked npz access, on-disk caches of decoded arrays, and downloads.

Every failure here becomes a one-line `PrivbenchError` naming the file and the fix, so that no reader
can return a silently partial dataset.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import tarfile
import urllib.request
import warnings
import zipfile
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from privbench.data.base import DATASETS, missing
from privbench.data.transforms import center_crop_resize
from privbench.errors import PrivbenchError

T = TypeVar("T")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NETWORK_ERRORS = (OSError, RuntimeError, http.client.HTTPException)  # URLError is an OSError
_CHUNK = 512  # images per decoding task: big enough to amortise the pool, small enough for a smooth bar


def reason(e: BaseException) -> str:
    """The first line of an exception's message (some, like tarfile's, span several), for one-line errors."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _hidden(name: str) -> bool:
    """Archive litter (macOS resource forks, dot files) that is never part of a dataset."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class Tree(ABC):
    """Read-only files under a directory or inside a zip, named by relative POSIX paths.

    One interface for both, so that a reader does not care whether the user unpacked the archive.
    Use as a context manager: a zip stays open while its members are read.
    """

    path: Path

    @abstractmethod
    def files(self, under: str = "") -> list[str]:
        """Sorted names of all files below the folder `under` ("" for all)."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The bytes of one member; a failure is a one-line error naming it."""

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether the member exists."""

    @abstractmethod
    def where(self, name: str) -> str:
        """How to name a member in an error message."""

    @abstractmethod
    def cache(self, stem: str) -> Path:
        """Where to keep an .npz of arrays decoded from this tree: beside the data."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DirTree(Tree):
    def __init__(self, path: Path, prefix: str = ""):
        self.path, self.root = path, path / prefix

    def files(self, under: str = "") -> list[str]:
        top = self.root / under
        found = []
        for folder, _, names in os.walk(top):
            rel = Path(folder).relative_to(self.root).as_posix()
            found += [n if rel == "." else f"{rel}/{n}" for n in names]
        return sorted(n for n in found if not _hidden(n))

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as e:
            raise PrivbenchError(f"cannot read {self.where(name)} ({e.strerror or e}): check the file") from e

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def where(self, name: str) -> str:
        return str(self.root / name)

    def cache(self, stem: str) -> Path:
        return self.root / f"{stem}.npz"


class ZipTree(Tree):
    def __init__(self, path: Path, prefix: str = ""):
        self.path, self.prefix = path, prefix
        try:
            self._zip = zipfile.ZipFile(path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise PrivbenchError(f"{path} is not a readable zip ({e}): it is truncated or corrupt, get it again") from e
        self._names = sorted(
            n[len(prefix):] for n in names if n.startswith(prefix) and not n.endswith("/") and not _hidden(n)
        )
        self._members = set(self._names)

    def files(self, under: str = "") -> list[str]:
        return [n for n in self._names if n.startswith(under)]

    def read(self, name: str) -> bytes:
        try:
            return self._zip.read(self.prefix + name)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as e:
            raise PrivbenchError(f"cannot read {self.where(name)} ({e}): the zip is corrupt, get it again") from e

    def has(self, name: str) -> bool:
        return name in self._members

    def where(self, name: str) -> str:
        return f"{self.path}:{self.prefix}{name}"

    def cache(self, stem: str) -> Path:
        return self.path.with_name(f"{self.path.stem}-{stem}.npz")

    def close(self) -> None:
        self._zip.close()


def open_tree(path: Path, marker: str) -> Tree | None:
    """The tree at `path` whose root holds the folder `marker`, or None if there is none.

    `path` may be a .zip, a directory holding exactly one .zip, or an unpacked directory; the root
    may also be one folder down (official archives wrap everything in e.g. `tiny-imagenet-200/`).
    """
    if path.is_dir() and not (path / marker).is_dir():
        subdirs = [d for d in path.iterdir() if d.is_dir() and (d / marker).is_dir()]
        if len(subdirs) == 1:
            return DirTree(path, subdirs[0].name)
        zips = sorted(path.glob("*.zip"))
        if len(zips) > 1:
            raise PrivbenchError(f"{path} holds several zips ({', '.join(z.name for z in zips)}): pass one as the path")
        if not zips:
            return None
        path = zips[0]
    if path.is_dir():
        return DirTree(path)
    if path.suffix.lower() != ".zip" or not path.is_file():
        return None
    tree = ZipTree(path)
    if tree.files(marker + "/"):
        return tree
    tops = {n.split("/")[0] for n in tree.files() if n.count("/") >= 2 and n.split("/")[1] == marker}
    tree.close()
    return ZipTree(path, tops.pop() + "/") if len(tops) == 1 else None


def decode_images(
    tree: Tree, names: Sequence[str], resolution: int, channels: int, crop: bool = False, desc: str = "decoding"
) -> np.ndarray:
    """Decode `names` from `tree` into one uint8 [N, R, R, C] array.

    Without `crop` every image must already be R x R (the dataset's native size): a different size
    means a wrong or damaged file and is an error, never a silent resize. With `crop` each image is
    centre-cropped to a square and resized to R; JPEGs are then decoded at a reduced DCT scale that
    still leaves at least 2R pixels, which is several times faster on large photographs.
    Threads run in parallel because PIL releases the GIL while decoding.
    """
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(names), resolution, resolution, channels), np.uint8)

    def decode(start: int) -> int:
        for i in range(start, min(start + _CHUNK, len(names))):
            try:
                img = Image.open(io.BytesIO(tree.read(names[i])))
                if crop:
                    img.draft(mode, (2 * resolution, 2 * resolution))
                img = img.convert(mode)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise PrivbenchError(
                    f"cannot decode image {tree.where(names[i])} ({e}): replace it or get the dataset again"
                ) from e
            if crop:
                img = center_crop_resize(img, resolution)
            elif img.size != (resolution, resolution):
                raise PrivbenchError(
                    f"image {tree.where(names[i])} is {img.size[0]}x{img.size[1]}, expected "
                    f"{resolution}x{resolution}: this is not the expected release of the dataset"
                )
            out[i] = np.asarray(img).reshape(resolution, resolution, channels)
        return min(_CHUNK, len(names) - start)

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool, tqdm(
        total=len(names), desc=desc, unit="img", disable=None, leave=False
    ) as bar:
        for done in pool.map(decode, range(0, len(names), _CHUNK)):
            bar.update(done)
    return out


@contextmanager
def open_npz(path: Path) -> Iterator[Callable[[str], np.ndarray]]:
    """Yield `get(key)` for the arrays of an .npz, turning a missing key or a corrupt file into one line."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise PrivbenchError(f"cannot read {path} ({e}): it is truncated or corrupt, get it again") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise PrivbenchError(f"{path} holds a single array, not an .npz archive: is it the right file?")

    def get(key: str) -> np.ndarray:
        if key not in npz.files:
            raise PrivbenchError(f"{path} has no array {key!r} (it has {', '.join(npz.files)}): is it the right file?")
        try:
            return npz[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise PrivbenchError(f"cannot read array {key!r} of {path} ({e}): it is corrupt, get it again") from e

    with npz:
        yield get


def check_array(array: np.ndarray, shape: tuple[int | None, ...], where: str, dtype=np.uint8) -> np.ndarray:
    """`array` if its dtype is `dtype` (None: any) and its shape matches `shape` (None matches any length)."""
    if dtype is not None and array.dtype != dtype:
        raise PrivbenchError(f"{where} has dtype {array.dtype}, expected {np.dtype(dtype)}: is it the right file?")
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise PrivbenchError(f"{where} has shape {array.shape}, expected {want}: is it the right file?")
    return array


def check_labels(labels: np.ndarray, n_classes: int, where: str, offset: int = 0) -> np.ndarray:
    """Labels as int64 in [0, n_classes), after subtracting `offset` (1 for 1-based files)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise PrivbenchError(f"{where} has {labels.dtype} labels, expected integers: is it the right file?")
    labels = labels.astype(np.int64).reshape(-1) - offset
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise PrivbenchError(
            f"{where} has labels in [{labels.min() + offset}, {labels.max() + offset}], expected "
            f"[{offset}, {n_classes - 1 + offset}]: the file is corrupt or from another dataset"
        )
    return labels


def cached_arrays(path: Path, key: dict, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from the .npz cache at `path` when it was written for the same `key`, else `build()` and save.

    For decoded datasets that are slow to read (CelebA: 200k JPEGs). The cache is derived data:
    a stale or damaged one is rebuilt, and one that cannot be written (read-only data) only warns.
    """
    stamp = json.dumps(key, sort_keys=True)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["__key__"]) == stamp:
                return {k: npz[k] for k in npz.files if k != "__key__"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    arrays = build()
    tmp = path.with_name(path.name + ".part.npz")
    try:
        np.savez(tmp, __key__=np.array(stamp), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the cache {path} ({e.strerror or e}); the next read will decode again")
    return arrays


def locate(
    dataset: str, path: Path, download: bool, find: Callable[[Path], T | None],
    fetch: Callable[[Path], None] | None = None,
) -> T:
    """What `find` finds at `path`; when nothing and `download`, fetch first; else the dataset's "missing" error."""
    found = find(path)
    if found is None and download and fetch is not None:
        fetch(path)
        found = find(path)
    if found is None:
        raise missing(DATASETS.get(dataset), path)
    return found


@contextmanager
def network(dataset: str, url: str, dest: Path) -> Iterator[None]:
    """Turn any network failure inside the block into one line naming the dataset, the URL and the manual fix."""
    try:
        yield
    except NETWORK_ERRORS as e:
        raise PrivbenchError(
            f"could not download {dataset} from {url} ({reason(e)}): "
            f"download it by hand and put it at {dest}"
        ) from e


def fetch_url(url: str, dest: Path, dataset: str, md5: str | None = None) -> Path:
    """Download `url` to `dest` (via a .part file, so `dest` existing means complete) unless it is there."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        with network(dataset, url, dest), urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f, tqdm(
            total=int(response.headers.get("Content-Length") or 0) or None,
            desc=f"downloading {dataset}", unit="B", unit_scale=True, disable=None, leave=False,
        ) as bar:
            while block := response.read(1 << 20):
                f.write(block)
                digest.update(block)
                bar.update(len(block))
        if md5 and digest.hexdigest() != md5:
            raise PrivbenchError(f"the download of {dataset} from {url} is corrupt (md5 mismatch): download it by hand and put it at {dest}")
    except PrivbenchError:
        part.unlink(missing_ok=True)
        raise
    shutil.move(part, dest)
    return dest


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack a downloaded .tar(.gz) into `dest`; members may not escape it (tarfile's "data" filter)."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise PrivbenchError(f"cannot unpack {archive} ({reason(e)}): delete it and download again") from e


def decode_cropped(tree: Tree, names: Sequence[str], resolution: int, channels: int, stem: str, desc: str) -> np.ndarray:
    """Centre-cropped, resized `names` (photographs of any size), cached beside the data as `stem`.

    Every listed file must exist before anything is decoded or a cache is trusted; the cache is
    keyed by the listing and the output size, so a different release or resolution decodes afresh.
    """
    absent = next((n for n in names if not tree.has(n)), None)
    if absent is not None:
        raise PrivbenchError(f"{tree.where(absent)} is missing: get the complete dataset again")
    key = {
        "names": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "resolution": resolution, "channels": channels,
    }

    def build() -> dict[str, np.ndarray]:
        return {"images": decode_images(tree, names, resolution, channels, crop=True, desc=desc)}

    return cached_arrays(tree.cache(stem), key, build)["images"]
