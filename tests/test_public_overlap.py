"""A public set must be public: a sensitive set named as public is refused when the configuration is
resolved, and public images that copy sensitive ones (exactly, or resized or re-encoded) are refused
before anything trains on them."""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import privbench.data as data
import privbench.harness as harness
from privbench import cli
from privbench.config import parse_overrides, resolve
from privbench.data import ImageSet
from privbench.data import overlap
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.store import Store

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR, TINY = SHARED / "cifar10-jpeg.zip", SHARED / "tiny-imagenet-200-jpeg.zip"


def privimage(sets=()):
    return resolve(METHODS.get("privimage"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(list(sets)))


def resampled(image: np.ndarray, *sizes: int) -> np.ndarray:
    """`image` resized through `sizes` (bicubic) and back, then saved as JPEG at quality 75."""
    mode = "L" if image.shape[-1] == 1 else "RGB"
    picture = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
    for size in (*sizes, image.shape[0]):
        picture = picture.resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=75)
    decoded = np.asarray(Image.open(buffer).convert(mode))
    return decoded[..., None] if mode == "L" else decoded


def with_images(images: ImageSet, extra: list[np.ndarray], at: list[int]) -> ImageSet:
    """`images` with `extra` inserted at the indices `at` of the result."""
    stacked = np.insert(images.images, [a - k for k, a in enumerate(at)], np.stack(extra), axis=0)
    labels = np.insert(images.labels, [a - k for k, a in enumerate(at)], 0)
    return ImageSet(stacked, labels.astype(np.int64), images.classes, images.name)


@pytest.fixture(scope="module")
def mnist():
    return {"train": data.load("mnist", "train"), "test": data.load("mnist", "test")}


@pytest.fixture(scope="module")
def glyphs():
    return data.load("glyphs", "train", 28, size=620)


@pytest.mark.parametrize("method", ["privimage", "pdp-diffusion", "dp-merf"])
def test_a_sensitive_set_named_as_public_is_refused_at_resolve(method):
    with pytest.raises(PrivbenchError, match=r"^mnist is a sensitive dataset, not a public one: .* --set public=NAME"):
        resolve(METHODS.get(method), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["public=mnist"]))
    with pytest.raises(PrivbenchError, match="cifar10 is a sensitive dataset"):
        resolve(METHODS.get(method), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["public=cifar10"]))


def test_load_data_refuses_a_sensitive_public_set_before_reading(monkeypatch):
    config = dataclasses.replace(privimage(), public="mnist")  # built around validation
    monkeypatch.setattr(harness, "load", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(PrivbenchError, match="mnist is a sensitive dataset"):
        harness.load_data(config, METHODS.get("privimage"))


def test_the_cli_refuses_a_sensitive_public_set(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--method", "privimage", "--eps", "1", "--set", "public=mnist", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mnist is a sensitive dataset" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_an_exact_copy_of_a_member_is_refused(mnist, glyphs):
    public = with_images(glyphs, [mnist["train"].images[401], mnist["test"].images[7]], at=[12, 30])
    with pytest.raises(PrivbenchError) as refused:
        overlap.screen_public("mnist", mnist, "glyphs", public, None)
    message = str(refused.value)
    assert message.startswith("public set glyphs holds 2 images that duplicate sensitive mnist images (public #12 ~ train "
                              "#401 exactly, public #30 ~ test #7 exactly)")
    assert message.endswith("leave them out with --set data.public_duplicates=drop, remove them from the public set, "
                            "or pick another with --set public=NAME")


def test_duplicates_can_be_left_out_instead(mnist, glyphs, caplog):
    public = with_images(glyphs, [mnist["train"].images[401], mnist["test"].images[7]], at=[12, 30])
    with caplog.at_level("WARNING"):
        kept = overlap.screen_public("mnist", mnist, "glyphs", public, None, action="drop")
    assert len(kept) == len(public) - 2 and "left out 2 image(s)" in caplog.text
    assert not any(np.array_equal(image, mnist["train"].images[401]) for image in kept.images)
    assert overlap.find_duplicates(mnist, kept) == []
    assert overlap.screen_public("mnist", mnist, "glyphs", glyphs, None, action="drop") is glyphs


@pytest.mark.parametrize("sizes", [(20,), (23,), (56,)], ids=["28-20-28", "28-23-28", "28-56-28"])
def test_a_resized_re_encoded_member_is_refused(mnist, glyphs, sizes):
    copy = resampled(mnist["train"].images[1234], *sizes)
    assert not np.array_equal(copy, mnist["train"].images[1234])
    (found,) = overlap.find_duplicates(mnist, with_images(glyphs, [copy], at=[5]))
    assert (found.public, found.split, found.sensitive) == (5, "train", 1234)
    assert 0 < found.distance < overlap.THRESHOLD


def test_a_greyscale_or_brightened_copy_of_a_colour_image_is_caught():
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC))
    noise = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    sensitive = {"train": ImageSet(np.concatenate([noise, smooth[None]]), np.zeros(51, np.int64), ("x",), "s")}
    grey = np.repeat(np.asarray(Image.fromarray(smooth).convert("L"))[..., None], 3, axis=-1)
    brighter = np.clip(smooth.astype(int) + 15, 0, 255).astype(np.uint8)
    public = ImageSet(np.stack([grey, brighter, noise[0][::-1]]), np.zeros(3, np.int64), ("x",), "p")
    assert {(d.public, d.sensitive) for d in overlap.find_duplicates(sensitive, public)} == {(0, 50), (1, 50)}


def test_the_embedded_public_set_holds_no_copy_of_mnist(mnist):
    # The default pairing of the smoke runs (9,300 glyphs, seed 0), and a draw (seed 3) in which a
    # rendered "l" lies within THRESHOLD of a handwritten 1 that other 1s resemble almost as closely.
    assert overlap.find_duplicates(mnist, data.load("glyphs", "train", 28)) == []
    glyphs = data.load("glyphs", "train", 28, seed=3)
    close = overlap.close_pairs(overlap.embed(glyphs.images), overlap.embed(mnist["train"].images), overlap.THRESHOLD)
    assert {glyphs.classes[glyphs.labels[p]] for p in close[0]} == {"l"}
    assert overlap.find_duplicates(mnist, glyphs) == []


def test_the_check_is_cached_by_both_sets(mnist, glyphs, tmp_path, monkeypatch):
    calls = []
    find = overlap.find_duplicates
    monkeypatch.setattr(overlap, "find_duplicates", lambda *a, **k: calls.append(1) or find(*a, **k))
    assert overlap.cached_duplicates(mnist, glyphs, tmp_path) == []
    assert overlap.cached_duplicates(mnist, glyphs, tmp_path) == [] and len(calls) == 1  # the second is a cache hit
    assert len(list((tmp_path / "public-overlap").iterdir())) == 1
    copied = with_images(glyphs, [mnist["train"].images[3]], at=[0])
    (found,) = overlap.cached_duplicates(mnist, copied, tmp_path)  # another public set: computed again
    assert (found.public, found.sensitive, found.distance, len(calls)) == (0, 3, 0.0, 2)
    (again,) = overlap.cached_duplicates(mnist, copied, tmp_path)
    assert again == found and len(calls) == 2


def test_a_run_with_a_copied_member_stops_before_its_run_directory(tmp_path, monkeypatch):
    real_load = harness.load

    def load(name, split, *args, **kwargs):
        images = real_load(name, split, *args, **kwargs)
        if name != "glyphs":
            return images
        member = real_load("mnist", "train").images[77]
        return with_images(images, [resampled(member, 20)], at=[3])

    monkeypatch.setattr(harness, "load", load)
    store = Store(tmp_path)
    with pytest.raises(PrivbenchError, match=r"public set glyphs holds 1 image that duplicates sensitive mnist images "
                                             r"\(public #3 ~ train #77 at 0\.0"):
        harness.run(privimage(["data.public_size=200"]), store, progress=False)
    assert not list(store.root.glob("runs/*"))


needs_shared = pytest.mark.skipif(not (CIFAR.is_file() and TINY.is_file()),
                                  reason=f"the development copies of CIFAR-10 and Tiny-ImageNet are absent from {SHARED}")


@needs_shared
def test_cifar10_test_against_tiny_imagenet_val_flags_only_planted_copies():
    # About 10 s on 2 cores, most of it decoding the JPEGs. Unplanted, no pair lies within 2 x THRESHOLD.
    cifar = {"test": data.load("cifar10", "test", path=CIFAR)}
    tiny = data.load("tiny-imagenet", "val", 32, path=TINY)
    picks = np.random.default_rng(0).choice(len(cifar["test"]), 60, replace=False)
    planted = [resampled(cifar["test"].images[i], size) for i, size in zip(picks, [24, 64, 32] * 20)]
    at = sorted(np.random.default_rng(1).choice(len(tiny) + len(picks), len(picks), replace=False).tolist())
    found = overlap.find_duplicates(cifar, with_images(tiny, planted, at))
    assert sorted((d.public, d.sensitive) for d in found) == sorted(zip(at, picks.tolist()))


def test_an_unknown_duplicate_action_is_refused_at_resolve():
    with pytest.raises(PrivbenchError, match="setting 'data.public_duplicates' must be one of: refuse, drop, got keep"):
        resolve(METHODS.get("privimage"), "mnist", 1.0, 0, "smoke", "cpu", parse_overrides(["data.public_duplicates=keep"]))
