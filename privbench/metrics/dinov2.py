"""FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics and their
unfair treatment of diffusion models", NeurIPS): the Fréchet distance computed on DINOv2 ViT features
instead of Inception's, which that study found to agree better with human judgement of realism.

privbench never downloads weights. The metric is computed when PRIVBENCH_DINOV2_WEIGHTS names a local
checkpoint, either
  - a TorchScript file that maps normalised images [N, 3, 224, 224] to features [N, D], or
  - a state dict, with PRIVBENCH_DINOV2_ARCH naming its architecture in timm (`pip install timm`),
    e.g. vit_large_patch14_dinov2 for the ViT-L/14 that Stein et al. use. DINOv2's own checkpoints
    (dinov2_vitl14_pretrain.pth) load through timm's conversion of their keys; the features are the
    CLS token.
Images are fed as the study's code feeds DINOv2: resized to 224x224 (bicubic, antialiased), scaled to
[0, 1] and normalised with ImageNet's mean and standard deviation. The reference set's features are
cached like Inception's, keyed by the checkpoint's SHA-1.
"""

from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from privbench.errors import PrivbenchError
from privbench.metrics.frechet import FeatureExtractor
from privbench.metrics.inception import file_sha1, network_outputs, weights_from_env

WEIGHTS_ENV = "PRIVBENCH_DINOV2_WEIGHTS"
ARCH_ENV = "PRIVBENCH_DINOV2_ARCH"
INPUT_SIZE = 224
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def dinov2_input(chunk: np.ndarray, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """uint8 NHWC RGB images as DINOv2 takes them: [n, 3, 224, 224], ImageNet-normalised."""
    x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True, align_corners=False)
    return (x.clamp(0, 1) - IMAGENET_MEAN) / IMAGENET_STD


def extractor() -> FeatureExtractor | None:
    """The DINOv2 feature extractor of the checkpoint PRIVBENCH_DINOV2_WEIGHTS names, or None when unset."""
    if (path := weights_from_env(WEIGHTS_ENV, "a local DINOv2 checkpoint")) is None:
        return None
    model, dim = _load(str(path.resolve()), os.environ.get(ARCH_ENV) or None)

    def compute(images: np.ndarray, device: str, batch_size: int | None, progress: bool) -> np.ndarray:
        return network_outputs(model.to(device), images, device, batch_size, progress, desc="dinov2", prepare=dinov2_input)

    return FeatureExtractor("dinov2", file_sha1(path), dim, compute)


@functools.lru_cache(maxsize=None)
def _load(path: str, arch: str | None) -> tuple[torch.nn.Module, int]:
    """The network and its feature dimension (measured on one blank image)."""
    model = _from_state_dict(path, arch) if arch else _from_torchscript(path)
    with torch.inference_mode():
        dim = model.eval()(dinov2_input(np.zeros((1, 8, 8, 3), np.uint8))).shape[-1]
    return model, int(dim)


def _from_torchscript(path: str) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
            return torch.jit.load(path, map_location="cpu")
    except RuntimeError:
        raise PrivbenchError(
            f"{WEIGHTS_ENV}={path} is not a TorchScript file: for a state dict, also set {ARCH_ENV} to its timm "
            "architecture, e.g. vit_large_patch14_dinov2"
        ) from None


def _from_state_dict(path: str, arch: str) -> torch.nn.Module:
    try:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
    except ImportError:
        raise PrivbenchError(f"{ARCH_ENV}={arch} needs timm to build the network: pip install timm") from None
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=INPUT_SIZE)
    except RuntimeError:
        raise PrivbenchError(f"{ARCH_ENV}={arch} is not a timm architecture: e.g. vit_large_patch14_dinov2") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint_filter_fn(state, model))
    except (RuntimeError, KeyError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PrivbenchError(f"{WEIGHTS_ENV}={path} is not a state dict of {arch} ({first}): check {ARCH_ENV}") from None
    return model
