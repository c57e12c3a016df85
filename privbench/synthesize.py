"""`privbench.fit`: a private synthesizer from images held as numpy arrays, for users with no folder
and no benchmark to run. The configuration is resolved and validated as `privbench run` resolves it
(presets, overrides, roles, ranges), every image is a member, and the method spends its budget
through the same PrivacyLedger. Nothing here is evaluated or audited: that is `privbench run`'s work.

This module is imported with `privbench`, so it imports torch and the methods only inside `fit`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from privbench.errors import PrivbenchError

if TYPE_CHECKING:
    from privbench.data.base import ImageSet


@dataclass(frozen=True)
class PrivateSynthesizer:
    """A fitted synthesizer and the guarantee it was trained under (`ledger`, `epsilon`, `delta`).

    `sample` reads only the synthesizer, never the members: it is post-processing and spends no
    budget. Successive calls continue one seeded stream, so a script's draws repeat as a whole.
    """

    synthesizer: Any  # the method's synthesizer (privbench.methods.Synthesizer)
    ledger: Any  # the PrivacyLedger every use of the members was recorded in
    epsilon: float  # the ledger's composed epsilon: what the guarantee is
    config: Any  # the resolved RunConfig
    classes: tuple[str, ...]  # the name of each label
    generator: Any  # the torch.Generator that samples draw from

    @property
    def delta(self) -> float:
        return self.ledger.delta

    def sample(self, n: int, labels: Sequence[int] | np.ndarray | None = None) -> ImageSet:
        """`n` synthetic images (uint8 NHWC, `.images`) with their labels (`.labels`); `labels` picks
        each image's class, else they follow the class mix the method learned."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise PrivbenchError(f"sample(n): n must be a positive number of images, got {n!r}")
        if labels is not None:
            labels = _labels(labels, len(self.classes))
            if len(labels) != n:
                raise PrivbenchError(f"sample(n, labels): {len(labels)} labels for {n} images: give one label per image")
        return self.synthesizer.sample(int(n), labels, generator=self.generator)


def fit(
    method: str, images: np.ndarray, labels: Sequence[int] | np.ndarray, *, epsilon: float, delta: float | None = None,
    preset: str = "smoke", seed: int = 0, classes: Sequence[str] | None = None, device: str = "auto",
    workdir: str | Path | None = None, **overrides: Any,
) -> PrivateSynthesizer:
    """Fit `method` to `images` (uint8 [N, H, W, C], C 1 or 3, square) with int `labels` in
    [0, number of classes) under (`epsilon`, `delta`); every image is a member.

    `preset` and `**overrides` are `privbench run`'s `--preset` and `--set`, as nested mappings
    (`params={"epochs": 2}`, `public="glyphs"`, `privacy={"randomness": "os"}`); `delta` defaults to
    the preset's. The images are resized to the preset's `data.resolution`, or kept at their own.
    `classes` names the labels (default "0", "1", ...). `workdir` keeps the method's files and caches
    (public pre-training) for the next fit; by default they go to a temporary directory.
    """
    from privbench.config import harness_presets, resolve
    from privbench.context import RunContext, Task
    from privbench.data.arrays import NAME as ARRAYS
    from privbench.data.base import ImageSet
    from privbench.data.transforms import resize
    from privbench.harness import check_delta, load_public, new_ledger
    from privbench.methods import METHODS
    from privbench.runtime import resolve_device
    from privbench.settings import merge

    images = _images(images)
    labels = _labels(labels, len(classes) if classes is not None else None)
    classes = tuple(classes) if classes is not None else tuple(str(c) for c in range(int(labels.max(initial=0)) + 1))
    if len(labels) != len(images):
        raise PrivbenchError(f"fit: {len(labels)} labels for {len(images)} images: give one label per image")
    if len(set(labels.tolist())) < 2:
        raise PrivbenchError("fit: the labels hold fewer than two classes: a class-conditional synthesizer needs at least two")
    if delta is not None:
        overrides = merge(overrides, {"delta": delta})
    if harness_presets().get(preset, {}).get("data", {}).get("resolution") is None:
        overrides = merge({"data": {"resolution": images.shape[1]}}, overrides)  # the arrays' own size, unless set
    method_cls = METHODS.get(method)
    device_ = resolve_device(device)
    config = resolve(method_cls, ARRAYS, epsilon, seed, preset, str(device_), overrides)
    if config.audit.with_canaries:
        raise PrivbenchError("fit: audit.canaries and audit.canary_examples plant canaries for an audit, which privbench.fit "
                             "does not run: drop them, or audit with `privbench run`")
    check_delta(config.delta, len(images))
    members = ImageSet(resize(images, config.data.resolution), labels, classes, f"{ARRAYS} members")
    with tempfile.TemporaryDirectory(prefix="privbench-fit-") as scratch:
        root = Path(workdir).expanduser() if workdir is not None else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        public = None
        if method_cls.uses_public:
            from privbench.config import run_datasets

            _, public_spec = run_datasets(config, True)
            public = load_public(config, public_spec.name, {"members": members}, root / "cache", device_)
        ctx = RunContext(root, root / "cache", device_, config.seed, progress=False, compute=config.compute,
                         privacy=config.privacy)
        ledger = new_ledger(config)
        synthesizer = method_cls(config.params).fit(Task(members, public, classes), ledger, ctx)
    return PrivateSynthesizer(synthesizer, ledger, ledger.spent(), config, classes, ctx.generator("sample"))


def _images(images: Any) -> np.ndarray:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] in (1, 3) and images.shape[1] == images.shape[2] and len(images)):
        shape = getattr(images, "shape", None)
        raise PrivbenchError(f"fit: images must be a non-empty uint8 numpy array [N, H, H, C] with C 1 or 3, got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {shape}: convert them, e.g. "
                             "np.clip(x * 255, 0, 255).astype(np.uint8), and crop them square")
    return images


def _labels(labels: Any, n_classes: int | None) -> np.ndarray:
    """Labels as int64, each in [0, n_classes) (None: any number of classes, numbered from 0)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PrivbenchError(f"labels must be a 1-D array of integers, got {labels.dtype} {labels.shape}: "
                             "e.g. np.asarray(y, np.int64)")
    if len(labels) and (labels.min() < 0 or (n_classes is not None and labels.max() >= n_classes)):
        bound = f"[0, {n_classes}) for {n_classes} classes" if n_classes is not None else "[0, number of classes)"
        raise PrivbenchError(f"labels must lie in {bound}, got {labels.min()}..{labels.max()}: "
                             "number the classes from 0, or pass classes=[...] naming every one")
    return labels.astype(np.int64)
