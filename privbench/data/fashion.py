"""`fashion-mnist`: Zalando's Fashion-MNIST in its official IDX files (what torchvision downloads into
`FashionMNIST/raw/`): 60,000 train and 10,000 test 28x28 greyscale images of 10 kinds of clothing."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.data.files import check_labels, fetch_url, locate
from privbench.errors import PrivbenchError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# split -> (images, labels), each the official file name and its MD5 (as torchvision checks them)
FILES = {
    "train": (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
              ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe")),
    "test": (("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
             ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")),
}
IDX_IMAGES, IDX_LABELS = 0x803, 0x801  # the IDX magic numbers: unsigned bytes in 3 and in 1 dimensions
TORCHVISION = Path("FashionMNIST") / "raw"


def _folder(path: Path) -> Path | None:
    """Where the IDX files are: `path` itself or torchvision's FashionMNIST/raw below it."""
    for folder in (path, path / TORCHVISION):
        if any((folder / name).is_file() or (folder / name.removesuffix(".gz")).is_file()
               for name, _ in FILES["train"] + FILES["test"]):
            return folder
    return None


def read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """The array of an IDX file (gzipped or not), checked against its magic number and item `shape`."""
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise PrivbenchError(f"cannot read {path} ({e}): it is truncated or corrupt, download Fashion-MNIST again") from e
    dims = len(shape) + 1
    header = np.frombuffer(raw[: 4 * (dims + 1)], ">u4") if len(raw) >= 4 * (dims + 1) else np.zeros(0)
    if len(header) != dims + 1 or header[0] != magic or tuple(header[2:]) != shape:
        raise PrivbenchError(f"{path} is not an IDX file of {'x'.join(map(str, shape)) or 'scalar'} items: "
                             "download Fashion-MNIST again")
    count = int(header[1])
    body = np.frombuffer(raw, np.uint8, offset=4 * (dims + 1))
    if body.size != count * int(np.prod(shape, dtype=np.int64)):
        raise PrivbenchError(f"{path} holds {body.size} bytes for {count} items: it is truncated, download Fashion-MNIST again")
    return body.reshape(count, *shape)


def _file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise PrivbenchError(f"{folder / name} is missing: put all four Fashion-MNIST IDX files in {folder}, or fetch them "
                         "with `privbench data download fashion-mnist`")


def fetch(path: Path) -> None:
    for name, md5 in FILES["train"] + FILES["test"]:
        fetch_url(URL + name, path / name, "fashion-mnist", md5)


def read(split: str, path: Path, download: bool) -> ImageSet:
    folder = locate("fashion-mnist", path, download, _folder, fetch)
    (images_name, _), (labels_name, _) = FILES[split]
    images = read_idx(_file(folder, images_name), IDX_IMAGES, (28, 28))
    labels_file = _file(folder, labels_name)
    labels = check_labels(read_idx(labels_file, IDX_LABELS, ()), len(CLASSES), str(labels_file))
    if len(labels) != len(images):
        raise PrivbenchError(f"{labels_file} has {len(labels)} labels for {len(images)} images: download Fashion-MNIST again")
    return ImageSet(np.ascontiguousarray(images[..., None]), labels, CLASSES, f"fashion-mnist/{split}")


register(DatasetSpec(
    name="fashion-mnist", role="sensitive",
    description="Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 greyscale images of 10 kinds of clothing",
    native_resolution=28, channels=1, splits=("train", "test"),
    where="the official IDX files train|t10k-images-idx3-ubyte.gz and train|t10k-labels-idx1-ubyte.gz "
          "(or torchvision's FashionMNIST/raw/ holding them)",
    read=read, default_public="glyphs", downloadable=True, fetch=fetch,
))
