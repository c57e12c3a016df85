"""privbench.fit: the README's example runs; inputs are validated at the boundary; `import privbench` stays light."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import privbench
from privbench.data import load
from privbench.errors import PrivbenchError

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {"params": {"d_rff": 200, "epochs": 1}}


def readme_example() -> str:
    section = README.read_text().split("## Images held as arrays: `privbench.fit`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"epsilon (9\.9\d\d|10\.000), delta 1e-05", printed) and "mean-embedding" in printed
    with np.load(tmp_path / "synthetic.npz") as copy:
        assert copy["images"].shape == (1000, 28, 28, 1) and copy["images"].dtype == np.uint8
        assert set(copy["labels"].tolist()) <= set(range(10))


@pytest.fixture(scope="module")
def digits():
    train = load("mnist", "train")
    picks = np.random.default_rng(0).permutation(len(train))[:600]  # the train split is sorted by class
    return train.images[picks], train.labels[picks]


def test_fit_uses_the_ledger_and_the_run_configuration(digits):
    images, labels = digits
    fitted = privbench.fit("dp-merf", images, labels, epsilon=1.0, classes=[f"digit {d}" for d in range(10)],
                           device="cpu", preset="cpu", **TINY)
    assert 0.99 <= fitted.epsilon <= 1.0 + 1e-6 and fitted.delta == 1e-5
    assert [m["name"] for m in fitted.ledger.to_dict()["mechanisms"]] == ["mean-embedding"]
    assert fitted.config.dataset == "arrays" and fitted.config.data.resolution == 16 and fitted.config.params.d_rff == 200
    first = fitted.sample(5, labels=[0, 1, 2, 3, 3])
    assert first.images.shape == (5, 16, 16, 1) and first.labels.tolist() == [0, 1, 2, 3, 3]
    assert first.classes[0] == "digit 0"
    assert not np.array_equal(first.images, fitted.sample(5, labels=[0, 1, 2, 3, 3]).images)  # one stream, continued


@pytest.mark.parametrize(
    "change, message",
    [
        ({"images": "float"}, "images must be a non-empty uint8 numpy array"),
        ({"images": "wide"}, "crop them square"),
        ({"labels": "short"}, "599 labels for 600 images"),
        ({"labels": "negative"}, "labels must lie in [0, number of classes), got -1..8"),
        ({"labels": "names"}, "labels must be a 1-D array of integers, got <U21 (600,)"),
        ({"labels": "one class"}, "fewer than two classes"),
        ({"delta": 0.01}, "delta 0.01 is not below 1/600 members"),
        ({"method": "dp-merff"}, "did you mean 'dp-merf'"),
        ({"overrides": {"params": {"d_rf": 1}}}, "did you mean 'params.d_rff'"),
        ({"overrides": {"params": {"epochs": -1}}}, "setting 'params.epochs' must be a positive integer"),
        ({"epsilon": 0}, "epsilon must be > 0"),
        ({"method": "privimage"}, "arrays has no default public set"),
    ],
)
def test_mistakes_are_one_line_errors_before_any_training(digits, change, message, monkeypatch):
    from privbench.methods import METHODS

    monkeypatch.setattr(METHODS.get("dp-merf"), "fit", lambda *a, **k: pytest.fail("trained on bad input"))
    images, labels = digits
    images = {"float": images.astype(np.float32), "wide": images[:, :, :20]}.get(change.get("images"), images)
    labels = {"short": labels[1:], "negative": labels - 1, "one class": np.zeros_like(labels),
              "names": labels.astype(str)}.get(change.get("labels"), labels)
    kwargs = {"epsilon": change.get("epsilon", 1.0), **({"delta": change["delta"]} if "delta" in change else {}),
              **change.get("overrides", {})}
    with pytest.raises(PrivbenchError) as error:
        privbench.fit(change.get("method", "dp-merf"), images, labels, device="cpu", **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_public_set_is_screened_for_copies_of_the_given_images(monkeypatch):
    from privbench.methods import METHODS

    monkeypatch.setattr(METHODS.get("privimage"), "fit", lambda *a, **k: pytest.fail("trained with a leaking public set"))
    glyphs = load("glyphs", "train", size=620)
    with pytest.raises(PrivbenchError, match="public set glyphs holds .* sensitive arrays images"):
        privbench.fit("privimage", glyphs.images[:200], glyphs.labels[:200] % 10, epsilon=1.0, device="cpu",
                      public="glyphs", data={"public_size": 620})


def test_sample_validates_its_arguments(digits):
    fitted = privbench.fit("dp-merf", *digits, epsilon=1.0, device="cpu", **TINY)
    for args, message in (((0,), "n must be a positive number"), ((2, [0, 10]), "labels must lie in [0, 10)"),
                          ((3, [0, 1]), "2 labels for 3 images")):
        with pytest.raises(PrivbenchError, match=re.escape(message)):
            fitted.sample(*args)


def test_the_arrays_dataset_has_no_files_to_read(tmp_path):
    with pytest.raises(PrivbenchError, match="is the images passed to privbench.fit"):
        load("arrays", "train", path=tmp_path)


def test_importing_privbench_imports_neither_torch_nor_the_methods():
    code = "import sys, privbench; print(sorted(m for m in ('torch', 'pandas', 'privbench.methods') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
