"""FD_DINOv2 from local weights only: a TorchScript stand-in, a state dict with its timm architecture,
and a one-line error for every way the setting can be wrong."""

import numpy as np
import pytest
import torch
from torch import nn

from privbench.errors import PrivbenchError
from privbench.metrics import dinov2
from privbench.metrics.inception import file_sha1

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")


def images(n=5, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 20, 20, channels), dtype=np.uint8)


@pytest.fixture
def torchscript(dinov2_stand_in, monkeypatch):
    monkeypatch.setenv(dinov2.WEIGHTS_ENV, str(dinov2_stand_in[1]))
    monkeypatch.delenv(dinov2.ARCH_ENV, raising=False)
    return dinov2_stand_in


def test_unset_means_no_extractor(monkeypatch):
    monkeypatch.delenv(dinov2.WEIGHTS_ENV, raising=False)
    assert dinov2.extractor() is None


def test_a_torchscript_file_gives_its_features_of_the_normalised_224_px_images(torchscript):
    model, path = torchscript
    extractor = dinov2.extractor()
    assert extractor.dim == 6 and extractor.weights_sha1 == file_sha1(path)
    x = images()
    with torch.inference_mode():
        expected = model(dinov2.dinov2_input(x)).double().numpy()
    np.testing.assert_allclose(extractor.compute(x, "cpu", 2, False), expected, rtol=1e-5, atol=1e-6)
    grey = images(channels=1)
    np.testing.assert_allclose(extractor.compute(grey, "cpu", None, False),
                               extractor.compute(np.repeat(grey, 3, axis=-1), "cpu", None, False))


def test_the_input_is_imagenet_normalised_at_224_px():
    white = dinov2.dinov2_input(np.full((1, 8, 8, 3), 255, np.uint8))
    assert white.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(white[0, :, 0, 0], (1 - dinov2.IMAGENET_MEAN.flatten()) / dinov2.IMAGENET_STD.flatten(), rtol=1e-6)


def test_a_state_dict_loads_into_its_timm_architecture(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    monkeypatch.setenv(dinov2.WEIGHTS_ENV, str(path))
    monkeypatch.setenv(dinov2.ARCH_ENV, "vit_tiny_patch16_224")
    extractor = dinov2.extractor()
    x = images(2)
    with torch.inference_mode():
        expected = model(dinov2.dinov2_input(x)).double().numpy()
    assert extractor.dim == 192
    np.testing.assert_allclose(extractor.compute(x, "cpu", None, False), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case, complaint", [
    ("missing", "is not a file: point it at a local DINOv2 checkpoint"),
    ("not-torchscript", "is not a TorchScript file: for a state dict, also set PRIVBENCH_DINOV2_ARCH"),
    ("unknown-arch", "is not a timm architecture"),
    ("wrong-arch", "is not a state dict of vit_tiny_patch16_224"),
])
def test_a_wrong_setting_is_one_line_naming_it(case, complaint, tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    if case != "missing":
        torch.save(nn.Conv2d(3, 6, kernel_size=16).state_dict(), path)
    monkeypatch.setenv(dinov2.WEIGHTS_ENV, str(path))
    monkeypatch.delenv(dinov2.ARCH_ENV, raising=False)
    if case in ("unknown-arch", "wrong-arch"):
        pytest.importorskip("timm")
        monkeypatch.setenv(dinov2.ARCH_ENV, "no_such_vit" if case == "unknown-arch" else "vit_tiny_patch16_224")
    with pytest.raises(PrivbenchError, match=complaint) as raised:
        dinov2.extractor()
    assert "\n" not in str(raised.value)
