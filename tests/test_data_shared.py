"""The real development copies in ../shared/data, read straight from their zips (about 35 s on 2 cores)."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import privbench.data as data
from privbench.data import cifar

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR, TINY = SHARED / "cifar10-jpeg.zip", SHARED / "tiny-imagenet-200-jpeg.zip"


def needs(path: Path):
    return pytest.mark.skipif(not path.is_file(), reason=f"{path} is absent (the development copies live in ../shared/data)")


def decoded(zip_path: Path, member: str) -> np.ndarray:
    with zipfile.ZipFile(zip_path) as z:
        return np.asarray(Image.open(io.BytesIO(z.read(member))).convert("RGB"))


@needs(CIFAR)
def test_cifar10_jpeg_zip_in_full():
    train, test = data.load("cifar10", "train", path=CIFAR), data.load("cifar10", "test", path=CIFAR)
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes == cifar.CLASSES
    # Labels follow the class folders and pixels are the members' own: test/cat is label 3, files in name order.
    np.testing.assert_array_equal(test.images[3000], decoded(CIFAR, "test/cat/0000.jpg"))
    np.testing.assert_array_equal(train.images[-1], decoded(CIFAR, "train/truck/4999.jpg"))
    assert data.load("cifar10", "test", resolution=16, path=CIFAR).images.shape == (10000, 16, 16, 3)


@needs(TINY)
def test_tiny_imagenet_jpeg_zip_in_full():
    train, val = data.load("tiny-imagenet", "train", path=TINY), data.load("tiny-imagenet", "val", path=TINY)
    assert train.images.shape == (60600, 64, 64, 3) and val.images.shape == (10100, 64, 64, 3)
    assert len(train.classes) == 202 and train.classes == val.classes == tuple(sorted(train.classes))
    assert np.bincount(train.labels).tolist() == [300] * 202 and np.bincount(val.labels).tolist() == [50] * 202
    first = train.classes[0]
    np.testing.assert_array_equal(train.images[0], decoded(TINY, f"train/{first}/{first}_0.JPEG"))
    grey = (val.images[..., 0] == val.images[..., 1]).all(axis=(1, 2)) & (val.images[..., 1] == val.images[..., 2]).all(axis=(1, 2))
    assert 0.005 < grey.mean() < 0.04, "the 1.7% greyscale images are read as RGB with equal channels"


@needs(TINY)
def test_tiny_imagenet_downsampled_to_32():
    small = data.load("tiny-imagenet", "val", resolution=32, path=TINY)
    assert small.images.shape == (10100, 32, 32, 3) and small.images.dtype == np.uint8
