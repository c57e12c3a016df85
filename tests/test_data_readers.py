"""Every reader on small fixtures written here in the exact on-disk format of its release."""

import csv
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import privbench.data as data
from privbench.data import cifar, derm
from privbench.errors import PrivbenchError

rng = np.random.default_rng(0)


def one_line_error(match, fn, *args, **kwargs) -> str:
    with pytest.raises(PrivbenchError) as e:
        fn(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text
    for part in [match] if isinstance(match, str) else match:
        assert part in text, text
    return text


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# --- cifar10: pickles -------------------------------------------------------------------------------

def write_cifar_pickles(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    pixels = {}
    for batch in cifar.BATCHES["train"] + cifar.BATCHES["test"]:
        rows, labels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), rng.integers(0, 10, per_batch).tolist()
        (folder / batch).write_bytes(pickle.dumps({b"batch_label": batch.encode(), b"labels": labels, b"data": rows}))
        pixels[batch] = (rows, labels)
    names = [c.encode() for c in cifar.CLASSES]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}))
    return folder, pixels


def test_cifar_pickles_round_trip(tmp_path):
    _, pixels = write_cifar_pickles(tmp_path)
    train = data.load("cifar10", "train", path=tmp_path)
    rows = np.concatenate([pixels[b][0] for b in cifar.BATCHES["train"]])
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert train.labels.tolist() == sum((pixels[b][1] for b in cifar.BATCHES["train"]), [])
    assert train.classes == cifar.CLASSES and train.name == "cifar10/train"
    test = data.load("cifar10", "test", path=tmp_path / "cifar-10-batches-py", resolution=16)
    assert test.images.shape == (4, 16, 16, 3)


def test_cifar_default_path_is_under_data_root(tmp_path, monkeypatch):
    write_cifar_pickles(tmp_path / "cifar10")
    monkeypatch.setenv("PRIVBENCH_DATA", str(tmp_path))
    assert len(data.load("cifar10", "test")) == 4


def test_cifar_missing_says_where_and_how_to_download(tmp_path):
    one_line_error([f"not found at {tmp_path}", "cifar-10-batches-py", "privbench data download cifar10"],
                   data.load, "cifar10", path=tmp_path)


def test_cifar_missing_batch(tmp_path):
    folder, _ = write_cifar_pickles(tmp_path)
    (folder / "data_batch_3").unlink()
    one_line_error([str(folder / "data_batch_3"), "is missing"], data.load, "cifar10", path=tmp_path)
    assert len(data.load("cifar10", "test", path=tmp_path)) == 4


def test_cifar_truncated_pickle(tmp_path):
    folder, _ = write_cifar_pickles(tmp_path)
    batch = folder / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:500])
    one_line_error([str(batch), "truncated or corrupt", "download CIFAR-10 again"], data.load, "cifar10", path=tmp_path)


def test_cifar_wrong_shape(tmp_path):
    folder, _ = write_cifar_pickles(tmp_path)
    batch = folder / "test_batch"
    batch.write_bytes(pickle.dumps({b"labels": [0, 1], b"data": np.zeros((2, 3000), np.uint8)}))
    one_line_error([str(batch), "(2, 3000)", "expected Nx3072"], data.load, "cifar10", "test", path=tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder, _ = write_cifar_pickles(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    one_line_error(["test_batch", "refusing to load builtins.print"], data.load, "cifar10", "test", path=tmp_path)


def test_cifar_download_fetches_and_unpacks(tmp_path, monkeypatch):
    source, pixels = write_cifar_pickles(tmp_path / "source")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")

    def fake_fetch(url, dest, dataset, md5):
        assert (url, dataset, md5) == (cifar.URL, "cifar10", cifar.MD5)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(archive.read_bytes())
        return dest

    monkeypatch.setattr(cifar, "fetch_url", fake_fetch)
    target = tmp_path / "home"
    test = data.load("cifar10", "test", path=target, download=True)
    np.testing.assert_array_equal(test.labels, pixels["test_batch"][1])
    assert (target / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert data.download("cifar10", tmp_path / "again") == tmp_path / "again"


def test_corrupt_download_archive(tmp_path, monkeypatch):
    def fake_fetch(url, dest, dataset, md5):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"\x1f\x8b garbage")
        return dest

    monkeypatch.setattr(cifar, "fetch_url", fake_fetch)
    one_line_error(["cifar-10-python.tar.gz", "delete it and download again"], data.download, "cifar10", tmp_path)


# --- cifar10 and tiny-imagenet: ImageFolder ---------------------------------------------------------

def imagefolder_files(classes, splits=("train", "test"), size=32, per_class=2, layout="{split}/{cls}/{i}.png"):
    """{member name: PNG bytes} and the expected arrays per split, in class order."""
    files, expected = {}, {}
    for split in splits:
        images, labels = [], []
        for label, cls in enumerate(classes):
            for i in range(per_class):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                files[layout.format(split=split, cls=cls, i=i)] = png(image)
                images.append(image)
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels))
    return files, expected


def write_tree(root, files):
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def write_zip(path, files, prefix=""):
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(prefix + name, content)
    return path


@pytest.mark.parametrize("packed", ["dir", "zip", "dir-with-zip"])
def test_cifar_imagefolder_round_trip(tmp_path, packed):
    files, expected = imagefolder_files(cifar.CLASSES)
    if packed == "dir":
        path = write_tree(tmp_path, files)
    else:
        path = write_zip(tmp_path / "cifar.zip", files)
        path = tmp_path if packed == "dir-with-zip" else path
    for split in ("train", "test"):
        got = data.load("cifar10", split, path=path)
        np.testing.assert_array_equal(got.images, expected[split][0])
        np.testing.assert_array_equal(got.labels, expected[split][1])
        assert got.classes == cifar.CLASSES


def test_imagefolder_unknown_class_folder(tmp_path):
    files, _ = imagefolder_files(cifar.CLASSES[:2] + ("unicorn",), splits=("test",), per_class=1)
    files["train/cat/0.png"] = files["test/unicorn/0.png"]
    write_tree(tmp_path, files)
    one_line_error(["test/unicorn is not a class of cifar10/test"], data.load, "cifar10", "test", path=tmp_path)


def test_imagefolder_corrupt_jpeg(tmp_path):
    files, _ = imagefolder_files(cifar.CLASSES, per_class=1)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "JPEG")
    files["test/cat/0.jpg"] = buffer.getvalue()[:100]
    path = write_zip(tmp_path / "c.zip", files)
    one_line_error([f"{path}:test/cat/0.jpg", "cannot decode image", "get the dataset again"],
                   data.load, "cifar10", "test", path=path)


def test_imagefolder_wrong_image_size(tmp_path):
    files, _ = imagefolder_files(cifar.CLASSES, per_class=1)
    files["test/dog/0.png"] = png(np.zeros((30, 30, 3), np.uint8))
    write_tree(tmp_path, files)
    one_line_error(["test/dog/0.png", "is 30x30, expected 32x32"], data.load, "cifar10", "test", path=tmp_path)


def test_imagefolder_empty_split(tmp_path):
    files, _ = imagefolder_files(cifar.CLASSES, splits=("train",), per_class=1)
    write_tree(tmp_path, files)
    one_line_error(["cifar10/test: no images found", str(tmp_path)], data.load, "cifar10", "test", path=tmp_path)


def test_truncated_zip(tmp_path):
    files, _ = imagefolder_files(cifar.CLASSES, per_class=1)
    path = write_zip(tmp_path / "c.zip", files)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error([str(path), "not a readable zip", "truncated or corrupt"], data.load, "cifar10", path=path)


WNIDS = ("n01443537", "n01629819", "n02124075")


def test_tiny_imagenet_official_layout_in_wrapped_zip(tmp_path):
    files, expected = imagefolder_files(WNIDS, splits=("train",), size=64, layout="{split}/{cls}/images/{cls}_{i}.JPEG")
    files.update({f"train/{w}/{w}_boxes.txt": b"boxes" for w in WNIDS})
    annotations, val = [], []
    for i, label in enumerate([2, 0, 1, 0]):
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        files[f"val/images/val_{i}.JPEG"] = png(image)  # PNG bytes under the official name: lossless
        annotations.append(f"val_{i}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
        val.append((image, label))
    grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    files["val/images/val_4.JPEG"] = png(grey)
    annotations.append(f"val_4.JPEG\t{WNIDS[1]}\t0\t0\t63\t63")
    files["val/val_annotations.txt"] = "\n".join(annotations).encode()
    files["wnids.txt"] = "\n".join(reversed(WNIDS)).encode()
    files["test/images/test_0.JPEG"] = png(grey)
    path = write_zip(tmp_path / "tiny-imagenet-200.zip", files, prefix="tiny-imagenet-200/")

    train = data.load("tiny-imagenet", "train", path=tmp_path)
    np.testing.assert_array_equal(train.images, expected["train"][0])
    np.testing.assert_array_equal(train.labels, expected["train"][1])
    assert train.classes == WNIDS  # sorted, whatever the order of wnids.txt
    got = data.load("tiny-imagenet", "val", path=path)
    np.testing.assert_array_equal(got.images[:4], np.stack([v[0] for v in val]))
    assert got.labels.tolist() == [2, 0, 1, 0, 1]
    np.testing.assert_array_equal(got.images[4], np.repeat(grey[..., None], 3, axis=2))  # greyscale -> RGB
    assert data.load("tiny-imagenet", "val", path=path, resolution=32).images.shape == (5, 32, 32, 3)


def test_tiny_imagenet_imagefolder_layout(tmp_path):
    files, expected = imagefolder_files(WNIDS, splits=("train", "val"), size=64, layout="{split}/{cls}/{cls}_{i}.JPEG")
    write_tree(tmp_path, files)
    got = data.load("tiny-imagenet", "val", path=tmp_path)
    np.testing.assert_array_equal(got.images, expected["val"][0])
    np.testing.assert_array_equal(got.labels, expected["val"][1])
    assert got.classes == WNIDS and got.name == "tiny-imagenet/val"


def test_tiny_imagenet_bad_annotation(tmp_path):
    files, _ = imagefolder_files(WNIDS, splits=("train",), size=64, per_class=1)
    files["val/images/val_0.JPEG"] = files["train/n01443537/0.png"]
    files["val/val_annotations.txt"] = b"val_0.JPEG\tn99999999\t0\t0\t1\t1"
    write_tree(tmp_path, files)
    one_line_error(["val_annotations.txt line 1", "get tiny-imagenet-200 again"],
                   data.load, "tiny-imagenet", "val", path=tmp_path)


# --- celeba -----------------------------------------------------------------------------------------

ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive"] + [f"A{i}" for i in range(36)] + ["Male"]
ATTRS[20], ATTRS[-1] = "Male", "Young"  # Male is the 21st attribute, as in the release


def face(colour) -> bytes:
    """A 178x218 JPEG whose centre square (rows 20-197) is `colour`, with white rows above and below that
    the crop removes; the edges sit on JPEG's 8-pixel blocks so that no ringing reaches the square."""
    image = np.full((218, 178, 3), 255, np.uint8)
    image[16:200] = colour
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def write_celeba(root, n=6):
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    colours = rng.integers(30, 220, (n, 3))
    male = [1, -1, -1, 1, 1, -1][:n]
    rows = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        (folder / "img_align_celeba" / name).write_bytes(face(colours[i]))
        values = [-1] * 40
        values[ATTRS.index("Male")] = male[i]
        rows.append(name + " " + " ".join(f"{v:2d}" for v in values))
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(ATTRS) + " \n" + "\n".join(rows) + "\n")
    parts = [0, 0, 0, 1, 2, 2][:n]
    (folder / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(parts)))
    return folder, colours


def test_celeba_splits_labels_and_centre_crop(tmp_path):
    folder, colours = write_celeba(tmp_path)
    train = data.load("celeba32", "train", path=tmp_path)
    assert train.images.shape == (3, 32, 32, 3) and train.classes == ("female", "male")
    assert train.labels.tolist() == [1, 0, 0]
    # The white margins are cropped away: every pixel is near its face's colour (JPEG is lossy).
    assert np.abs(train.images.astype(int) - colours[:3, None, None, :]).max() <= 8
    assert data.load("celeba32", "val", path=tmp_path).labels.tolist() == [1]
    test = data.load("celeba64", "test", path=tmp_path)
    assert test.images.shape == (2, 64, 64, 3) and test.labels.tolist() == [1, 0]
    assert (folder / "privbench-celeba32-train.npz").is_file()


def test_celeba_reuses_its_cache_but_still_checks_the_listing(tmp_path):
    folder, _ = write_celeba(tmp_path)
    first = data.load("celeba32", "train", path=tmp_path)
    (folder / "img_align_celeba" / "000002.jpg").write_bytes(b"damaged after caching")
    np.testing.assert_array_equal(data.load("celeba32", "train", path=tmp_path).images, first.images)
    (folder / "img_align_celeba" / "000003.jpg").unlink()
    one_line_error(["img_align_celeba/000003.jpg is missing"], data.load, "celeba32", "train", path=tmp_path)


def test_celeba_corrupt_image(tmp_path):
    folder, _ = write_celeba(tmp_path)
    (folder / "img_align_celeba" / "000005.jpg").write_bytes(b"\xff\xd8 not really")
    one_line_error(["000005.jpg", "cannot decode image"], data.load, "celeba64", "test", path=tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("6\n", "7\n", 1), "announces 7 rows but has 6"),
    (lambda t: t.replace(" 1 ", " 2 ", 1), "line 3 does not hold"),
    (lambda t: t.replace("Male", "Female"), "'Male' is not in list"),
])
def test_celeba_bad_attribute_file(tmp_path, damage, message):
    folder, _ = write_celeba(tmp_path)
    attrs = folder / "list_attr_celeba.txt"
    attrs.write_text(damage(attrs.read_text()))
    one_line_error([str(attrs), message, "get the CelebA annotation files again"], data.load, "celeba32", path=tmp_path)


def test_celeba_bad_partition_and_missing_files(tmp_path):
    folder, _ = write_celeba(tmp_path)
    partition = folder / "list_eval_partition.txt"
    partition.write_text(partition.read_text() + "999999.jpg 0\n")
    one_line_error([str(partition), "line 7"], data.load, "celeba32", path=tmp_path)
    partition.unlink()
    one_line_error(["list_eval_partition.txt is missing"], data.load, "celeba32", path=tmp_path)
    one_line_error(["not found at", "img_align_celeba", "no scripted download"], data.load, "celeba32", path=tmp_path / "x")


# --- ham10000 and dermamnist ------------------------------------------------------------------------

def write_ham(root, lesions=12):
    rows, colours = [], {}
    for lesion in range(lesions):
        for k in range(1 + lesion % 2):  # some lesions have two images
            image_id = f"ISIC_{lesion:05d}{k}"
            colour = rng.integers(30, 220, 3)
            image = np.full((450, 600, 3), 255, np.uint8)
            image[:, 64:536] = colour  # holds the centre square (75-524), all that survives the crop
            folder = root / derm.IMAGE_FOLDERS[lesion % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{image_id}.jpg", quality=95)
            rows.append(dict(lesion_id=f"HAM_{lesion:07d}", image_id=image_id, dx=derm.CLASSES[lesion % 7],
                             dx_type="histo", age="50.0", sex="male", localization="back"))
            colours[image_id] = colour
    with open(root / derm.METADATA, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows, colours


def test_ham10000_split_by_lesion(tmp_path):
    rows, colours = write_ham(tmp_path)
    train, test = (data.load("ham10000", s, path=tmp_path) for s in ("train", "test"))
    assert train.images.shape[1:] == (64, 64, 3) and train.classes == derm.CLASSES
    expect = {s: [r for r in rows if derm.is_test_lesion(r["lesion_id"]) == (s == "test")] for s in ("train", "test")}
    assert len(expect["test"]) and len(expect["train"]), "the fixture should populate both splits"
    for split, got in (("train", train), ("test", test)):
        assert got.labels.tolist() == [derm.CLASSES.index(r["dx"]) for r in expect[split]]
        want = np.stack([colours[r["image_id"]] for r in expect[split]])
        assert np.abs(got.images.astype(int) - want[:, None, None, :]).max() <= 8
    small = data.load("ham10000", "test", path=tmp_path, resolution=32)
    assert small.images.shape == (len(test), 32, 32, 3)


def test_ham10000_errors(tmp_path):
    rows, _ = write_ham(tmp_path)
    metadata = tmp_path / derm.METADATA
    metadata.write_text(metadata.read_text().replace(",mel,", ",melanoma,"))
    one_line_error([str(metadata), "lesion_id, image_id, dx in akiec", "get HAM10000 again"],
                   data.load, "ham10000", path=tmp_path)
    metadata.unlink()
    one_line_error([str(metadata), "is missing"], data.load, "ham10000", path=tmp_path)


def write_derma(path, n=(5, 2, 3)):
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 7, (count, 1)).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_dermamnist_round_trip(tmp_path):
    arrays = write_derma(tmp_path / "dermamnist.npz")
    for split in ("train", "val", "test"):
        for path in (tmp_path, tmp_path / "dermamnist.npz"):
            got = data.load("dermamnist", split, path=path)
            np.testing.assert_array_equal(got.images, arrays[f"{split}_images"])
            assert got.labels.dtype == np.int64 and got.labels.tolist() == arrays[f"{split}_labels"][:, 0].tolist()
    assert data.verify("dermamnist", tmp_path) == "dermamnist: train 5, val 2, test 3 images, 28x28x3, 7 classes, ok"


@pytest.mark.parametrize("change, message", [
    (dict(train_images=np.zeros((5, 28, 28), np.uint8)), "train_images has shape (5, 28, 28), expected Nx28x28x3"),
    (dict(train_labels=np.full((5, 1), 7)), "labels in [7, 7], expected [0, 6]"),
    (dict(train_labels=np.zeros((4, 1), np.uint8)), "train_labels has shape (4, 1), expected 5x1"),
    (dict(train_images=None), "has no array 'train_images'"),
])
def test_dermamnist_bad_arrays(tmp_path, change, message):
    path = tmp_path / "dermamnist.npz"
    arrays = {**write_derma(path), **change}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    one_line_error([str(path), message], data.load, "dermamnist", path=tmp_path)


def test_dermamnist_truncated(tmp_path):
    path = tmp_path / "dermamnist.npz"
    write_derma(path)
    path.write_bytes(path.read_bytes()[:300])
    one_line_error([str(path), "truncated or corrupt"], data.load, "dermamnist", path=tmp_path)


# --- imagenet32 / imagenet64 ------------------------------------------------------------------------

def write_imagenet(root, resolution=32, per_batch=3, nested=True):
    folders = {s: root / (f"Imagenet{resolution}_{s}_npz" if nested else "") for s in ("train", "val")}
    expected = {}
    for split, names in (("train", [f"train_data_batch_{i}.npz" for i in range(1, 11)]), ("val", ["val_data.npz"])):
        folders[split].mkdir(parents=True, exist_ok=True)
        rows, labels = [], []
        for name in names:
            batch = rng.integers(0, 256, (per_batch, 3 * resolution**2), dtype=np.uint8)
            batch_labels = rng.integers(1, 1001, per_batch)
            np.savez(folders[split] / name, data=batch, labels=batch_labels.tolist(), mean=np.zeros(3 * resolution**2))
            rows.append(batch)
            labels.append(batch_labels)
        images = np.concatenate(rows).reshape(-1, 3, resolution, resolution).transpose(0, 2, 3, 1)
        expected[split] = (images, np.concatenate(labels) - 1)
    return folders, expected


@pytest.mark.parametrize("resolution, nested", [(32, True), (32, False), (64, True)])
def test_imagenet_npz_round_trip(tmp_path, resolution, nested):
    _, expected = write_imagenet(tmp_path, resolution, nested=nested)
    for split in ("train", "val"):
        got = data.load(f"imagenet{resolution}", split, path=tmp_path)
        np.testing.assert_array_equal(got.images, expected[split][0])
        np.testing.assert_array_equal(got.labels, expected[split][1])
        assert len(got.classes) == 1000 and got.classes[0] == "1"
    assert len(data.load(f"imagenet{resolution}", path=tmp_path)) == 30


def test_imagenet_missing_batch_and_bad_arrays(tmp_path):
    folders, _ = write_imagenet(tmp_path)
    (folders["train"] / "train_data_batch_7.npz").unlink()
    one_line_error(["train_data_batch_7.npz is missing", "Imagenet32_train_npz"], data.load, "imagenet32", path=tmp_path)
    val = folders["val"] / "val_data.npz"
    np.savez(val, data=np.zeros((2, 3072), np.uint8), labels=[0, 5])
    one_line_error([str(val), "labels in [0, 5], expected [1, 1000]"], data.load, "imagenet32", "val", path=tmp_path)
    np.savez(val, data=np.zeros((2, 1000), np.uint8), labels=[1, 5])
    one_line_error([str(val), "expected 2x3072"], data.load, "imagenet32", "val", path=tmp_path)
    one_line_error(["not found at", "login required"], data.load, "imagenet64", path=tmp_path / "none")
