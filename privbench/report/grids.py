"""Sample grids: one row per class, so a glance shows whether every class came out."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from privbench.data.base import ImageSet


def sample_grid(images: ImageSet, per_class: int = 10, max_classes: int = 20, scale: int = 2) -> bytes:
    """PNG bytes of up to `per_class` images for each of the first `max_classes` classes.

    A class with fewer samples leaves the rest of its row dark; each row starts with its class name.
    """
    classes = range(min(len(images.classes), max_classes))
    r, c = images.resolution, images.channels
    label_width = 8 * max(len(images.classes[k]) for k in classes) + 6
    grid = np.zeros((len(classes) * (r + 2), per_class * (r + 2), c), np.uint8)
    for row in classes:
        picks = np.flatnonzero(images.labels == row)[:per_class]
        for col, index in enumerate(picks):
            grid[row * (r + 2) + 1 : row * (r + 2) + 1 + r, col * (r + 2) + 1 : col * (r + 2) + 1 + r] = images.images[index]
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB")
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (pil.width + label_width, pil.height), "white")
    canvas.paste(pil, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    for row in classes:
        draw.text((3, row * (r + 2) * scale + (r * scale) // 2 - 5), images.classes[row], fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
