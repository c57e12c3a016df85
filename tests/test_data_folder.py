"""`folder`: a user's images in three layouts, as the sensitive or the public set; every bad folder
is one line naming the file and the fix; a folder runs end to end through `privbench run` and `export`."""

import json

import numpy as np
import pytest
from PIL import Image

import privbench.data as data
from privbench import cli
from privbench.config import DataConfig, parse_overrides, resolve
from privbench.data.folder import SPLIT_SEED, TEST_FRACTION
from privbench.errors import PrivbenchError
from privbench.harness import load_data
from privbench.methods import METHODS
from privbench.store import Store

CLASSES = ("cat", "dog", "owl")


def image(rng, label, size=(40, 30), mode="RGB"):
    """A picture of class `label`: a bright block whose place says the class, on noise; any size and mode."""
    w, h = size
    pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    pixels[: h // 2, label * w // 3 : (label + 1) * w // 3] = 230
    return Image.fromarray(pixels).convert(mode)


def write_folder(root, per_class=5, layout="classes", modes=("RGB", "L"), seed=0):
    """Write `per_class` images of each class: `classes` (<class>/...), `splits` (train|test/<class>/...)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            split = ("test" if i % 4 == 0 else "train") if layout == "splits" else ""
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            size = (40 + 3 * i, 30 + i)  # mixed sizes, never square
            image(rng, label, size, modes[i % len(modes)]).save(folder / f"{i}.png")
    return root


def write_csv(root, rows, header="file,label,split"):
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "labels.csv"


def test_an_imagefolder_with_splits_reads_at_any_size_and_mode(tmp_path):
    root = write_folder(tmp_path / "pets", layout="splits")
    train, test = data.load("folder", "train", 16, root), data.load("folder", "test", 16, root)
    assert train.classes == CLASSES and train.images.shape == (9, 16, 16, 3) and len(test) == 6
    assert np.bincount(test.labels).tolist() == [2, 2, 2]
    assert data.verify("folder", root) == "folder: train 9, test 6 images, 32x32x3, 3 classes, ok"
    grey = write_folder(tmp_path / "grey", layout="splits", modes=("L",))
    assert data.load("folder", "train", 16, grey).channels == 1  # greyscale only when every image is
    assert data.load("folder", "train", 16, grey, channels=3).channels == 3


def test_one_folder_is_split_by_a_seeded_recorded_rule(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=10)
    train, test = data.load("folder", "train", 8, root), data.load("folder", "test", 8, root)
    assert (len(train), len(test)) == (24, 6) and np.bincount(test.labels).tolist() == [2, 2, 2]
    again = data.load("folder", "test", 8, root)
    np.testing.assert_array_equal(test.images, again.images)
    other = data.load("folder", "test", 8, root, split_seed=1)
    assert not np.array_equal(test.images, other.images)
    assert len(data.load("folder", "test", 8, root, test_fraction=0.5)) == 15
    # the reader's defaults are the configuration's, so `data verify` splits as a run does
    assert (DataConfig.__dataclass_fields__["test_fraction"].default, DataConfig.__dataclass_fields__["split_seed"].default) \
        == (TEST_FRACTION, SPLIT_SEED)


def test_a_csv_labels_files_with_or_without_splits(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=4)
    rows = [f"{name}/{i}.png,{name},{'test' if i == 0 else 'train'}" for name in CLASSES for i in range(4)]
    csv_path = write_csv(root, rows)
    train, test = data.load("folder", "train", 8, csv_path), data.load("folder", "test", 8, csv_path)
    assert (len(train), len(test)) == (9, 3) and test.classes == CLASSES
    unsplit = write_csv(root, [r.rsplit(",", 1)[0] for r in rows], header="file,label")
    assert len(data.load("folder", "test", 8, unsplit)) == 3  # round(0.2 x 4) = 1 per class


def bad(path, message, split="train"):
    with pytest.raises(PrivbenchError) as error:
        data.load("folder", split, 8, path)
    text = str(error.value)
    assert message in text and "\n" not in text, text
    return text


def test_no_class_or_one_class(tmp_path):
    (tmp_path / "empty").mkdir()
    bad(tmp_path / "empty", "holds no images in class folders: a class-conditional synthesizer needs two classes")
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    for i in range(3):
        image(np.random.default_rng(i), 0).save(one / f"{i}.png")
    bad(tmp_path / "one", "holds one class, cat: a class-conditional synthesizer needs two classes or more")
    loose = write_folder(tmp_path / "loose")
    image(np.random.default_rng(0), 0).save(loose / "stray.png")
    bad(loose, f"{loose / 'stray.png'} is not in a class folder: move it into <class>/")


def test_an_empty_split(tmp_path):
    root = write_folder(tmp_path / "pets", layout="splits")
    for f in (root / "test").rglob("*.png"):
        f.unlink()
    bad(root, "the test split holds no images: put test/<class>/... beside train/")
    singles = write_folder(tmp_path / "singles", per_class=1)
    bad(singles, "the test split holds no images: add images: a class needs two or more")
    csv_path = write_csv(write_folder(tmp_path / "c", per_class=2), [f"{n}/{i}.png,{n},train" for n in CLASSES for i in range(2)])
    bad(csv_path, "the test split holds no images: mark some rows test in the split column")


def test_an_unreadable_or_corrupt_image(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "dog" / "9.png").write_bytes(b"not an image at all")
    bad(root, f"cannot read image {root / 'dog' / '9.png'}", split="test")
    (root / "dog" / "9.png").unlink()
    whole = (root / "owl" / "1.png").read_bytes()
    (root / "owl" / "1.png").write_bytes(whole[: len(whole) // 2])  # a valid header, truncated pixels
    errors = []
    for split in ("train", "test"):  # the split that holds it fails
        try:
            data.load("folder", split, 8, root)
        except PrivbenchError as e:
            errors.append(str(e))
    assert len(errors) == 1 and f"cannot decode image {root / 'owl' / '1.png'}" in errors[0] and "replace it" in errors[0]
    assert "\n" not in errors[0]


def test_csv_labels_without_files_and_files_without_labels(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=2)
    rows = [f"{n}/{i}.png,{n},train" for n in CLASSES for i in range(2)]
    missing = write_csv(root, [*rows, "owl/7.png,owl,test"])
    bad(missing, f"{missing} line 8 labels owl/7.png, which is not at {root / 'owl' / '7.png'}: fix the path")
    unlabelled = write_csv(root, rows[:-1])
    bad(unlabelled, f"{root / 'owl' / '1.png'} has no label in {unlabelled}: add a row for it")
    bad(write_csv(root, rows, header="path,class"), "must begin with the header row file,label")
    bad(write_csv(root, [*rows[:-1], "owl/1.png,,train"]), "line 7 has an empty label")


SMALL_RUN = ["params.d_rff=200", "params.epochs=1", "eval.samples=60", "eval.fid_samples=8", "eval.fid_reference=8",
             "eval.ca_epochs=1"]


def folder_config(root, extra=()):
    overrides = parse_overrides([*SMALL_RUN, f"data.path={root}", *extra])
    return resolve(METHODS.get("dp-merf"), "folder", 1.0, 0, "smoke", "cpu", overrides)


def test_too_few_images_for_the_split_the_preset_asks_for(tmp_path, capsys):
    few = write_folder(tmp_path / "few", per_class=5)
    with pytest.raises(PrivbenchError, match=f"folder at {few}: 12 train images leave no validation image for CA"):
        load_data(folder_config(few), METHODS.get("dp-merf"))
    with pytest.raises(PrivbenchError, match=f"folder at {few}: cannot hold out 500 non-members"):
        load_data(folder_config(few, ["data.non_members=500", "data.validation_fraction=0.5"]), METHODS.get("dp-merf"))
    short = write_folder(tmp_path / "short", per_class=12)
    with pytest.raises(PrivbenchError, match="the test split holds 6 images, and precision and recall compare each with its 7"):
        load_data(folder_config(short, ["eval.pr_k=7"]), METHODS.get("dp-merf"))
    out = tmp_path / "out"
    argv = ["run", "--method", "dp-merf", "--eps", "1", "--dataset", "folder", "--set", f"data.path={few}", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no validation image" in err and len(err.splitlines()) == 1 and not list(out.glob("runs/*"))


def test_a_folder_is_the_public_set_in_the_slot_it_fills(tmp_path):
    mnist_test = data.load("mnist", "test")
    root = tmp_path / "public"
    for i, (img, label) in enumerate(zip(mnist_test.images[::25], mnist_test.labels[::25])):  # 4 of each digit
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(img, 3, axis=-1)).save(root / str(label) / f"{i}.png")  # RGB copies
    config = resolve(METHODS.get("privimage"), "mnist", 1.0, 0, "smoke", "cpu",
                     parse_overrides(["public=folder", f"data.public_path={root}", "data.test_fraction=0.1"]))
    with pytest.raises(PrivbenchError, match="public set folder holds .* sensitive mnist images"):
        load_data(config, METHODS.get("privimage"))  # the overlap check applies to a user's folder
    clean = write_folder(tmp_path / "clean", per_class=6)
    config = resolve(METHODS.get("privimage"), "mnist", 1.0, 0, "smoke", "cpu",
                     parse_overrides(["public=folder", f"data.public_path={clean}"]))
    public = load_data(config, METHODS.get("privimage")).public
    assert public.images.shape[1:] == (28, 28, 1) and public.classes == CLASSES  # the sensitive set's size and mode


def test_a_folder_runs_end_to_end_and_exports(tmp_path, capsys):
    root = write_folder(tmp_path / "my-images", per_class=20)
    out, copy = tmp_path / "runs", tmp_path / "synthetic"
    sets = [a for item in [*SMALL_RUN, f"data.path={root}"] for a in ("--set", item)]
    assert cli.main(["run", "--method", "dp-merf", "--dataset", "folder", "--eps", "1", "--out", str(out), "--quiet",
                     *sets]) == 0
    assert "| dp-merf" in capsys.readouterr().out
    (row,) = Store(out).runs().to_dict("records")
    assert row["dataset"] == "folder" and json.loads(row["config"])["data"]["test_fraction"] == 0.2
    assert cli.main(["export", row["run_id"], "--n", "9", "--out", str(copy), "--runs", str(out)]) == 0
    pngs = sorted(copy.glob("*/*.png"))
    assert len(pngs) == 9 and {p.parent.name for p in pngs} <= set(CLASSES)
    assert np.asarray(Image.open(pngs[0])).shape == (32, 32, 3)
    assert json.loads((copy / "PRIVACY.json").read_text())["dataset"] == "folder"
