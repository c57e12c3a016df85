"""`glyphs`: an embedded public set of rendered letters and digits, the offline stand-in for ImageNet.

62 classes (0-9, A-Z, a-z), white on black like MNIST, drawn with the TrueType fonts that ship inside
matplotlib and randomised by font, scale, rotation, shear, stroke width, position and blur. It needs
no files and no network, so a fresh install can pre-train on public data and be tested end to end.
Its classes cover the digits of the embedded sensitive `mnist` and go beyond them, as ImageNet's do
for CIFAR-10. Every image is a pure function of (seed, split, size, resolution).
"""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import ft2font
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from privbench.data.base import DatasetSpec, ImageSet, register
from privbench.errors import PrivbenchError

CLASSES = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)
SIZES = {"train": 150 * len(CLASSES), "test": 30 * len(CLASSES)}
STREAMS = {"train": 0, "test": 1}  # independent random streams, so train and test never coincide
SUPERSAMPLE = 3  # draw at 3R and downsample: anti-aliased strokes at any R

# Text faces only: matplotlib also ships symbol and fallback fonts (cmsy10, cmex10, LastResortHE)
# whose character maps claim letters they draw as symbols or boxes.
FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmb10", "cmss10", "cmtt10", "cmti10",
)


@lru_cache(maxsize=None)
def font_files() -> tuple[Path, ...]:
    """The fonts of `FONTS` present in this matplotlib that have a glyph for every class."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = []
    for name in FONTS:
        path = folder / f"{name}.ttf"
        if path.is_file() and all(ft2font.FT2Font(str(path)).get_char_index(ord(c)) for c in CLASSES):
            found.append(path)
    if not found:
        raise PrivbenchError(f"no usable fonts in {folder}: reinstall matplotlib (pip install --force-reinstall matplotlib)")
    return tuple(found)


@lru_cache(maxsize=256)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def render(labels: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [N, R, R, 1] image of each class index in `labels`, with random style from `rng`."""
    n, canvas = len(labels), SUPERSAMPLE * resolution
    fonts = font_files()
    font = rng.integers(len(fonts), size=n)
    scale = rng.uniform(0.75, 1.1, n)
    angle = np.radians(rng.normal(0, 8, n).clip(-20, 20))
    shear = rng.normal(0, 0.12, n).clip(-0.3, 0.3)
    shift = rng.uniform(-0.08, 0.08, (n, 2)) * canvas
    stroke = rng.integers(0, 3, n) * canvas // 84  # 0-2 px at R = 28, proportionally more above
    blur = rng.uniform(0, 0.6, n) * SUPERSAMPLE
    size = int(0.8 * canvas)  # the em box fills most of the canvas; lowercase letters stay smaller
    centre = canvas / 2
    out = np.empty((n, resolution, resolution, 1), np.uint8)
    for i in range(n):
        img = Image.new("L", (canvas, canvas))
        ImageDraw.Draw(img).text(
            (centre, centre), CLASSES[labels[i]], fill=255, font=_font(fonts[font[i]], size),
            anchor="mm", stroke_width=int(stroke[i]), stroke_fill=255,
        )
        # Inverse affine map (output -> input) of: scale, shear, rotate about the centre, then shift.
        c, s = np.cos(angle[i]), np.sin(angle[i])
        forward = np.array([[c, -s], [s, c]]) @ np.array([[1, shear[i]], [0, 1]]) * scale[i]
        inverse = np.linalg.inv(forward)
        offset = np.array([centre, centre]) - inverse @ (np.array([centre, centre]) + shift[i])
        img = img.transform(
            img.size, Image.Transform.AFFINE, (*inverse[0], offset[0], *inverse[1], offset[1]),
            Image.Resampling.BILINEAR,
        )
        if blur[i] > 0.3:
            img = img.filter(ImageFilter.GaussianBlur(float(blur[i])))
        out[i, ..., 0] = np.asarray(img.reduce(SUPERSAMPLE))
    return out


def read(split: str, path: Path, download: bool, resolution: int, size: int | None = None, seed: int = 0) -> ImageSet:
    n = SIZES[split] if size is None else size
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise PrivbenchError(f"glyphs: size must be a positive number of images, got {size!r}")
    rng = np.random.default_rng([int(seed), STREAMS[split]])
    labels = rng.permutation(np.arange(n) % len(CLASSES))  # balanced: every class n/62 times, +-1
    return ImageSet(render(labels, resolution, rng), labels.astype(np.int64), CLASSES, f"glyphs/{split}")


SPEC = register(DatasetSpec(
    name="glyphs", role="public",
    description="62 classes of letters and digits rendered from matplotlib's fonts (embedded, any size)",
    native_resolution=28, channels=1, splits=("train", "test"),
    where="nothing (rendered on the fly)", read=read, embedded=True,
    options=("size", "seed"), direct_resolution=True,
))
