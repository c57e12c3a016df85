"""`privbench export`: a finished run's synthetic copy, drawn afresh from its saved synthesizer, with
the privacy guarantee it carries written beside it (PRIVACY.json).

Sampling reads only the fitted synthesizer, never the members: it is post-processing of what the
ledger accounted, and spends no budget, however many images are drawn.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from privbench.data import ImageSet
from privbench.errors import PrivbenchError
from privbench.store import Store, write_json, write_npz

log = logging.getLogger("privbench.export")

FORMATS = ("imagefolder", "npz")
PRIVACY_FILE = "PRIVACY.json"
NPZ_FILE = "samples.npz"
POST_PROCESSING = ("These images were sampled from a synthesizer trained under the privacy ledger above. Sampling reads "
                   "only the synthesizer, never the sensitive images, so it is post-processing: drawing them (or any "
                   "number of them) spent no privacy budget beyond the epsilon stated here.")
RANDOMNESS = {
    "seeded": "The mechanisms' noise and sampling were drawn from generators seeded by the run's published seed: "
              "whoever knows the seed can regenerate them, so the guarantee does not hold against such a reader. "
              "Before publishing, train again with --set privacy.randomness=os.",
    "os": "The mechanisms' noise and sampling were drawn from generators seeded from the operating system's entropy, "
          "stored nowhere.",
}


def export(store: Store, run_id: str, n: int, out: str | Path, fmt: str = "imagefolder", device: str = "auto") -> Path:
    """Draw `n` images from run `run_id`'s synthesizer into the new directory `out` (an ImageFolder
    `<class>/<i>.png`, or `samples.npz`) with PRIVACY.json beside them; returns `out`.

    Everything the user can get wrong is checked before anything is loaded, and `out` appears whole
    or not at all: the files are written to a temporary directory beside it, then renamed.
    """
    from privbench.config import from_dict
    from privbench.harness import load_data, restore_fit, run_context
    from privbench.methods import METHODS
    from privbench.metrics import CostRecorder
    from privbench.runtime import resolve_device

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PrivbenchError(f"--n must be a positive number of images, got {n!r}: e.g. --n 1000")
    if fmt not in FORMATS:
        raise PrivbenchError(f"unknown export format {fmt!r}: use --format {' or '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrivbenchError(f"{out} exists and is not an empty directory: export into a new one (nothing was overwritten)")
    if not store.has(run_id):
        raise PrivbenchError(f"no finished run {run_id!r} in {store.db_path}: see the run ids with "
                             "`privbench table --format csv`, or pass the run's --out")
    run_dir = store.run_dir(run_id)
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if config.audit.with_canaries:
        raise PrivbenchError(f"{run_id} is a canary run: its synthesizer was trained with canaries planted among the "
                             "members and is never sampled; export the same run without audit.canaries")
    row = store.runs().set_index("run_id").loc[run_id]
    ledger = json.loads((run_dir / "ledger.json").read_text())

    method_cls = METHODS.get(config.method)
    data = load_data(config, method_cls, store.cache_dir)
    ctx = run_context(config, run_dir, store, resolve_device(device), CostRecorder())
    synthesizer, _, _ = restore_fit(method_cls(config.params), run_dir, data.task(), ctx)
    # Post-processing: a seeded stream of its own, so the same export repeats and differs from the run's samples.
    samples = synthesizer.sample(n, generator=ctx.generator("export"))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if fmt == "npz":
            write_npz(staging / NPZ_FILE, images=samples.images, labels=samples.labels, classes=np.array(samples.classes))
        else:
            _write_imagefolder(samples, staging)
        write_json(staging / PRIVACY_FILE, privacy_statement(run_id, config, ledger, row, n, fmt))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %d images of %s to %s", n, run_id, out)
    return out


def _write_imagefolder(samples: ImageSet, root: Path) -> None:
    """`<class>/<i>.png`, i the image's index in the draw (so the npz and the folder name images alike)."""
    for name in samples.classes:
        (root / _folder_name(name)).mkdir()
    for i, (image, label) in enumerate(zip(samples.images, samples.labels)):
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(pixels).save(root / _folder_name(samples.classes[label]) / f"{i}.png")


def _folder_name(name: str) -> str:
    """A class name as one path component (a class name may hold a separator)."""
    return name.replace(os.sep, "_") if name not in ("", ".", "..") else f"class-{name or 'empty'}"


def privacy_statement(run_id: str, config: Any, ledger: dict, row: Any, n: int, fmt: str) -> dict[str, Any]:
    """What PRIVACY.json says: the guarantee of the run the images come from, as its ledger composed it."""
    epsilon = ledger["composed_epsilon"]
    return {
        "run_id": run_id,
        "method": config.method,
        "dataset": config.dataset,
        "images": n,
        "format": fmt,
        # strict JSON has no infinity: a run without privacy says so in words
        "epsilon": "inf (no privacy)" if math.isinf(epsilon) else epsilon,
        "target_epsilon": "inf" if math.isinf(ledger["target_epsilon"]) else ledger["target_epsilon"],
        "delta": ledger["delta"],
        "accountant": ledger["composed_with"],
        "mechanisms": ledger["mechanisms"],
        "randomness": ledger["randomness"],
        "randomness_note": RANDOMNESS[ledger["randomness"]],
        "config_hash": config.digest(),
        "commit": row["commit_id"],
        "sampling": POST_PROCESSING,
    }
