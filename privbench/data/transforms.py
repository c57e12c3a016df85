"""The uint8 NHWC boundary: resizing, done the way the reference datasets were made, and the one
conversion to and from the networks' float NCHW [-1, 1] convention."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_model(images, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 NHWC images (numpy or tensor) -> float32 NCHW in [-1, 1], the networks' convention, computed
    on `device` when given (the uint8 copy it moves is a quarter of the float one)."""
    x = torch.as_tensor(images)
    return (x if device is None else x.to(device)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC numpy, rounding to the nearest level and clamping."""
    return ((x.detach() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _filter(size: int, resolution: int) -> Image.Resampling:
    """BOX for integer-factor downsampling (how downsampled ImageNet was made), BICUBIC otherwise."""
    return Image.Resampling.BOX if size > resolution and size % resolution == 0 else Image.Resampling.BICUBIC


def resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """Square uint8 [N, H, H, C] images resized to [N, R, R, C]; returned as is when already R."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"resize expects square uint8 [N, H, H, C] images, got {images.dtype} {images.shape}")
    size, channels = images.shape[1], images.shape[3]
    if size == resolution:
        return images
    resample = _filter(size, resolution)
    out = np.empty((len(images), resolution, resolution, channels), np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        out[i] = np.asarray(pil.resize((resolution, resolution), resample)).reshape(resolution, resolution, channels)
    return out


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square of `img`, resized to R x R (CelebA and HAM10000, as DPDM/DPImageBench do)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    return square if side == resolution else square.resize((resolution, resolution), _filter(side, resolution))
