"""DPImageBench's other sensitive sets, each read from fixtures written in its official on-disk format:
Fashion-MNIST (IDX), CIFAR-100 (python pickles), EuroSAT (the RGB zip) and Camelyon17-WILDS."""

import gzip
import io
import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import privbench.data as data
from privbench import cli
from privbench.data import camelyon, cifar, eurosat, fashion
from privbench.errors import PrivbenchError


def one_line_error(parts, fn, *args, **kwargs):
    with pytest.raises(PrivbenchError) as error:
        fn(*args, **kwargs)
    text = str(error.value)
    assert "\n" not in text and all(p in text for p in parts), text


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_data_list_names_the_four(capsys):
    assert cli.main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("fashion-mnist", "cifar100", "eurosat", "camelyon"):
        assert f"\n{name} " in listing


# --- fashion-mnist: IDX files -----------------------------------------------------------------------

def idx(array, magic):
    header = np.array([magic, len(array), *array.shape[1:]], ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder, gz=True, counts=(6, 4)):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in zip(("train", "test"), counts):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
        (images_name, _), (labels_name, _) = fashion.FILES[split]
        for name, content in ((images_name, idx(images, fashion.IDX_IMAGES)), (labels_name, idx(labels, fashion.IDX_LABELS))):
            target = folder / (name if gz else name.removesuffix(".gz"))
            target.write_bytes(gzip.compress(content) if gz else content)
        arrays[split] = images, labels
    return arrays


def test_fashion_mnist_round_trip_in_both_layouts(tmp_path):
    arrays = write_fashion(tmp_path / "fashion")
    train = data.load("fashion-mnist", "train", path=tmp_path / "fashion")
    np.testing.assert_array_equal(train.images[..., 0], arrays["train"][0])
    assert train.labels.tolist() == arrays["train"][1].tolist() and train.classes == fashion.CLASSES
    plain = write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)  # torchvision's, unpacked
    test = data.load("fashion-mnist", "test", 14, tmp_path / "tv")
    assert test.images.shape == (4, 14, 14, 1) and test.labels.tolist() == plain["test"][1].tolist()
    assert data.verify("fashion-mnist", tmp_path / "fashion") == "fashion-mnist: train 6, test 4 images, 28x28x1, 10 classes, ok"


def test_fashion_mnist_damage_is_one_line(tmp_path):
    folder = tmp_path / "f"
    write_fashion(folder)
    one_line_error([f"not found at {tmp_path / 'none'}", "privbench data download fashion-mnist"], data.load,
                   "fashion-mnist", path=tmp_path / "none")
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    one_line_error([str(images), "truncated"], data.load, "fashion-mnist", "test", path=folder)
    images.write_bytes(images.read_bytes()[:30])
    one_line_error([str(images), "truncated or corrupt"], data.load, "fashion-mnist", "test", path=folder)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx(np.zeros((6, 28, 28)), fashion.IDX_IMAGES)))
    one_line_error([str(labels), "is not an IDX file"], data.load, "fashion-mnist", "train", path=folder)
    labels.unlink()
    one_line_error([str(labels), "is missing"], data.load, "fashion-mnist", "train", path=folder)


def test_fashion_mnist_downloads_the_official_files(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_fashion(source)
    fetched = []

    def fake_fetch(url, dest, dataset, md5):
        fetched.append((url, md5))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / dest.name, dest)
        return dest

    monkeypatch.setattr(fashion, "fetch_url", fake_fetch)
    assert len(data.load("fashion-mnist", "test", path=tmp_path / "got", download=True)) == 4
    assert fetched == [(fashion.URL + name, md5) for name, md5 in fashion.FILES["train"] + fashion.FILES["test"]]


# --- cifar100: python pickles -----------------------------------------------------------------------

def write_cifar100(root, counts=(5, 3)):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in zip(("train", "test"), counts):
        pixels, fine = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist()
        batch = {b"data": pixels, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"filenames": []}
        (folder / split).write_bytes(pickle.dumps(batch))
        arrays[split] = pixels, fine
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder, arrays


def test_cifar100_round_trip_with_fine_labels(tmp_path):
    _, arrays = write_cifar100(tmp_path)
    train = data.load("cifar100", "train", path=tmp_path)
    np.testing.assert_array_equal(train.images, arrays["train"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert train.labels.tolist() == arrays["train"][1] and train.classes[7] == "class7" and len(train.classes) == 100
    assert data.load("cifar100", "test", 16, tmp_path / "cifar-100-python").images.shape == (3, 16, 16, 3)


def test_cifar100_damage_is_one_line(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    (folder / "test").unlink()
    one_line_error([str(folder / "test"), "is missing"], data.load, "cifar100", "test", path=tmp_path)
    (folder / "train").write_bytes((folder / "train").read_bytes()[:50])
    one_line_error([str(folder / "train"), "truncated or corrupt", "download CIFAR-100 again"], data.load, "cifar100",
                   path=tmp_path)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a", b"b"]}))
    one_line_error([str(folder / "meta"), "names 2 fine classes"], data.load, "cifar100", path=tmp_path)


def test_cifar100_downloads_and_unpacks(tmp_path, monkeypatch):
    source, _ = write_cifar100(tmp_path / "source")
    archive = tmp_path / "c100.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-100-python")

    def fake_fetch(url, dest, dataset, md5):
        assert (url, dataset, md5) == (cifar.URL_100, "cifar100", cifar.MD5_100)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, dest)
        return dest

    monkeypatch.setattr(cifar, "fetch_url", fake_fetch)
    assert len(data.load("cifar100", "test", path=tmp_path / "got", download=True)) == 3


# --- eurosat: the RGB zip ---------------------------------------------------------------------------

def write_eurosat(path, per_class=3, top="2750", classes=eurosat.CLASSES):
    rng = np.random.default_rng(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for c, name in enumerate(classes):
            for i in range(1, per_class + 1):
                pixels = np.full((64, 64, 3), 20 * c, np.uint8) + rng.integers(0, 5, (64, 64, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
                z.writestr(f"{top}/{name}/{name}_{i}.jpg", buffer.getvalue())
    return path


def test_eurosat_split_is_dpimagebenchs():
    torch.manual_seed(0)  # DPImageBench's data/preprocess_dataset.py
    _, test = torch.utils.data.random_split(range(27000), [23000, 4000])
    np.testing.assert_array_equal(eurosat.test_positions(27000), np.sort(test.indices))


def test_eurosat_zip_round_trip(tmp_path):
    archive = write_eurosat(tmp_path / "EuroSAT.zip")
    train, test = data.load("eurosat", "train", path=archive), data.load("eurosat", "test", path=tmp_path)
    assert (len(train), len(test)) == (26, 4) and train.images.shape[1:] == (64, 64, 3)
    assert train.classes == eurosat.CLASSES
    positions = eurosat.test_positions(30)
    expected = [eurosat.CLASSES.index(eurosat.CLASSES[p // 3]) for p in positions]
    assert test.labels.tolist() == expected
    assert abs(int(test.images[0].mean()) - 20 * expected[0]) <= 3  # the right file, decoded
    zenodo = write_eurosat(tmp_path / "z" / "EuroSAT_RGB.zip", top="EuroSAT_RGB")
    assert len(data.load("eurosat", "test", 32, zenodo)) == 4


def test_eurosat_damage_is_one_line(tmp_path):
    archive = write_eurosat(tmp_path / "EuroSAT.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("2750/Desert/Desert_1.jpg", b"")
    one_line_error(["2750/Desert/Desert_1.jpg", "is not in a EuroSAT class folder"], data.load, "eurosat", path=archive)
    partial = write_eurosat(tmp_path / "p" / "EuroSAT.zip", classes=eurosat.CLASSES[:-1])
    one_line_error([f"{partial}:2750/SeaLake/", "holds no images"], data.load, "eurosat", path=partial)
    one_line_error(["not found", "privbench data download eurosat"], data.load, "eurosat", path=tmp_path / "none")


# --- camelyon: Camelyon17-WILDS ---------------------------------------------------------------------

ROWS = [  # patient, node, x, y, tumor, center, split
    ("004", 4, 3328, 21792, 1, 0, 0), ("004", 4, 3360, 21792, 0, 0, 1), ("010", 1, 100, 200, 0, 1, 0),
    ("042", 0, 5, 6, 1, 2, 0), ("042", 0, 7, 8, 0, 2, 0), ("061", 3, 9, 10, 0, 3, 0), ("081", 2, 11, 12, 1, 4, 0),
]


def write_camelyon(root):
    rng = np.random.default_rng(3)
    lines = [",patient,node,x_coord,y_coord,tumor,slide,center,split"]
    for i, (p, n, x, y, tumor, center, split) in enumerate(ROWS):
        lines.append(f"{i},{p},{n},{x},{y},{tumor},{i},{center},{split}")
        folder = root / "patches" / f"patient_{p}_node_{n}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"patch_patient_{p}_node_{n}_x_{x}_y_{y}.png").write_bytes(
            png(np.full((96, 96, 3), 40 * i, np.uint8) + rng.integers(0, 3, (96, 96, 3), dtype=np.uint8)))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_camelyon_official_splits(tmp_path):
    root = write_camelyon(tmp_path / "camelyon17_v1.0")
    train, test = data.load("camelyon", "train", path=tmp_path), data.load("camelyon", "test", 16, root)
    assert train.labels.tolist() == [1, 0, 1] and train.images.shape == (3, 32, 32, 3)  # hospitals 0, 3, 4, split 0
    assert test.labels.tolist() == [1, 0] and test.images.shape == (2, 16, 16, 3)  # hospital 2
    assert abs(int(train.images[1].mean()) - 40 * 5) <= 2 and train.classes == camelyon.CLASSES
    assert list(root.glob("privbench-camelyon-train-32.npz"))  # cached beside the data


def test_camelyon_damage_is_one_line(tmp_path):
    root = write_camelyon(tmp_path / "c")
    patch = root / "patches" / "patient_042_node_0" / "patch_patient_042_node_0_x_7_y_8.png"
    patch.unlink()
    one_line_error([str(patch), "is missing"], data.load, "camelyon", "test", path=root)
    (root / "metadata.csv").write_text("patient,node\n004,4\n")
    one_line_error(["metadata.csv", "is not WILDS' Camelyon17 metadata"], data.load, "camelyon", path=root)
    (root / "metadata.csv").unlink()
    one_line_error(["metadata.csv", "is missing"], data.load, "camelyon", path=root)
    one_line_error(["not found", "privbench data download camelyon"], data.load, "camelyon", path=tmp_path / "none")
