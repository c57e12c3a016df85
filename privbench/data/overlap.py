"""Public images that duplicate sensitive ones, found before anything trains on them.

Methods pre-train on the public set without noise and without accounting, so a sensitive image that
is also in the public set (an exact copy, or the same photograph at another resolution or
re-encoded) would be learnt in the clear. Both sensitive splits are compared with the public set:
the train split whole (members, non-members and validation are all drawn from it), and the test
split, on which FID and CA are scored, so pre-training on it would flatter them.

Exact copies are found by a hash of each image's bytes. Near copies are found at a low resolution
where resampling and compression leave little trace: each image in greyscale, averaged down to
EMBED x EMBED and mean-subtracted (so brightness does not count), compared by the relative distance
||a - b|| / max(||a||, ||b||) (0: the same picture; 1 or more: unrelated ones). Being relative, it does
not let every pair of faint, low-contrast images match, and it tells a thin stroke from a thick bar of
the same shape, which a cosine (unit-norm) distance does not; it misses copies whose contrast was
changed by more than the threshold. A public image is a near copy of a sensitive one when it lies
within SURE of it, or within THRESHOLD and closer than RATIO times the distance from that sensitive
image to its nearest other sensitive image: it singles that image out. The second condition spares
pictures with almost no content (a straight stroke: a rendered "l" and a handwritten 1), which many
sensitive images resemble as closely. Images flat at EMBED x EMBED carry no picture and are matched
only exactly. The result for a (sensitive, public) pair is cached by their content hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privbench.data.base import ImageSet
from privbench.errors import PrivbenchError
from privbench.store import write_json

log = logging.getLogger("privbench.run")

EMBED = 8
# Measured at 32x32 on CIFAR-10 (train + test) against Tiny-ImageNet train (60,000 x 60,600 images):
# 2,000 CIFAR train images re-encoded at JPEG quality 75, resized 32->24->32 or 32->64->32 (bicubic),
# or resized and re-encoded lie within 0.086 of their originals; 99.2% of those resized 32->16->32,
# 99.5% at JPEG quality 50 and 95% resized 32->24->32 bilinearly lie within 0.10. The closest unrelated
# pairs lie at 0.167 and above; below them lie 5 Tiny-ImageNet images that are the same photographs as
# CIFAR train images, cropped differently (both sets come from web searches), at 0.067 to 0.166.
# MNIST digits resized 28->23->28 and re-encoded: 98.7% within 0.10 (28->19->28: 87%). Embedded glyphs
# against mnist: at the default size and seed the closest pair lies at 0.154, but over 4 other seeds
# (9,300 glyphs each) 2 rendered "l"s lie at 0.089 and 0.093 of handwritten 1s, whose nearest other
# mnist digits lie 1.6 times as far: RATIO spares them, and costs 1% of the resized MNIST copies above.
THRESHOLD = 0.10
SURE = 0.05  # 1.8 times closer than any unrelated pair measured: a copy, whatever its neighbours
RATIO = 0.5
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L"): a greyscale copy matches its colour original
_BLOCK = 4096  # images per side of one similarity block: 64 MiB of float32
_CPU = torch.device("cpu")
_FLAT = 1e-3  # thumbnails with less contrast than this are flat: no picture to compare


@dataclass(frozen=True)
class Duplicate:
    public: int  # index in the public set
    split: str  # the sensitive split holding the copy
    sensitive: int  # index in that split
    distance: float  # relative distance; 0 for an exact copy


def embed(images: np.ndarray) -> torch.Tensor:
    """[N, EMBED**2] mean-subtracted greyscale thumbnails of uint8 NHWC images, pixels in [0, 1]."""
    parts = []
    for start in range(0, len(images), _BLOCK):  # in blocks: a million images in float would not fit in memory
        x = torch.from_numpy(images[start : start + _BLOCK]).float() / 255
        grey = x[..., 0] if x.shape[-1] == 1 else x @ torch.tensor(LUMA)
        parts.append(F.adaptive_avg_pool2d(grey[:, None], EMBED).flatten(1))
    small = torch.cat(parts) if parts else torch.zeros(0, EMBED**2)
    return small - small.mean(dim=1, keepdim=True)


def close_pairs(queries: torch.Tensor, keys: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, key index, relative distance) of every pair of `embed` vectors closer than
    `threshold`. Exact and blockwise: a relative distance below t implies a cosine above
    sqrt(1 - t^2), so one matrix product per block finds every candidate, and only those are measured."""
    norm_q, norm_k = queries.norm(dim=1), keys.norm(dim=1)
    unit_q = torch.where(norm_q[:, None] > _FLAT, queries / norm_q.clamp_min(_FLAT)[:, None], 0.0)
    unit_k = torch.where(norm_k[:, None] > _FLAT, keys / norm_k.clamp_min(_FLAT)[:, None], 0.0)
    bound = math.sqrt(1 - threshold**2) - 1e-5  # float32 slack: a candidate too many, never one too few
    found: list[tuple[torch.Tensor, ...]] = []
    for q in range(0, len(queries), _BLOCK):
        for k in range(0, len(keys), _BLOCK):
            cosine = unit_q[q : q + _BLOCK] @ unit_k[k : k + _BLOCK].T
            rows = (cosine.amax(dim=1) > bound).nonzero().flatten()  # few: searching only them is fast
            i, j = (cosine[rows] > bound).nonzero(as_tuple=True)
            i, j = rows[i] + q, j + k
            distance = (queries[i] - keys[j]).norm(dim=1) / torch.maximum(norm_q[i], norm_k[j])
            close = distance < threshold
            found.append((i[close], j[close], distance[close]))
    if not found:  # an empty set
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    i, j, distance = (torch.cat(parts).cpu() for parts in zip(*found))
    return i.long().numpy(), j.long().numpy(), distance.double().numpy()


def nearest_other(keys: dict[str, torch.Tensor], split: str, index: int) -> float:
    """The relative distance from sensitive image `index` of `split` to its nearest other sensitive image."""
    key = keys[split][index]
    distances = []
    for other, vectors in keys.items():
        d = (vectors - key).norm(dim=1) / torch.maximum(vectors.norm(dim=1), key.norm()).clamp_min(_FLAT)
        if other == split:
            d[index] = math.inf
        distances.append(d.min() if len(d) else torch.tensor(math.inf))
    return float(min(distances))


def _digests(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]


def find_duplicates(sensitive: dict[str, ImageSet], public: ImageSet, device: torch.device = _CPU) -> list[Duplicate]:
    """Every public image that copies an image of a sensitive split, exactly or nearly, with its
    closest sensitive image (exact copies first). The search runs on `device`."""
    found: dict[int, Duplicate] = {}
    for split, images in sensitive.items():
        where = {digest: i for i, digest in enumerate(_digests(images.images))}
        for p, digest in enumerate(_digests(public.images)):
            if digest in where and p not in found:
                found[p] = Duplicate(p, split, where[digest], 0.0)
    queries = embed(public.images).to(device)
    keys = {split: embed(images.images).to(device) for split, images in sensitive.items()}
    for split, split_keys in keys.items():
        for p, i, distance in zip(*close_pairs(queries, split_keys, THRESHOLD)):
            singled_out = distance < SURE or distance < RATIO * nearest_other(keys, split, int(i))
            if singled_out and (p not in found or distance < found[p].distance):
                found[int(p)] = Duplicate(int(p), split, int(i), float(distance))
    return sorted(found.values(), key=lambda d: (d.distance, d.public))


def cached_duplicates(sensitive: dict[str, ImageSet], public: ImageSet, cache_dir: Path | None,
                      device: torch.device = _CPU) -> list[Duplicate]:
    """`find_duplicates`, computed once per (sensitive splits, public set, method) and cached."""
    if cache_dir is None:
        return find_duplicates(sensitive, public, device)
    key_text = json.dumps([{s: i.content_hash() for s, i in sensitive.items()}, public.content_hash(), EMBED, THRESHOLD, SURE,
                           RATIO])
    path = Path(cache_dir) / "public-overlap" / f"{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.json"
    try:
        return [Duplicate(**d) for d in json.loads(path.read_text())["duplicates"]]
    except (OSError, ValueError, TypeError, KeyError):
        pass  # absent or unreadable: computed again
    duplicates = find_duplicates(sensitive, public, device)
    write_json(path, {"public": public.name, "sensitive": list(sensitive),
                      "duplicates": [vars(d) for d in duplicates]})
    return duplicates


def screen_public(sensitive_name: str, sensitive: dict[str, ImageSet], public_name: str, public: ImageSet,
                  cache_dir: Path | None, device: torch.device = _CPU, action: str = "refuse") -> ImageSet:
    """The public set, checked against the sensitive splits. Public images that duplicate sensitive
    ones are refused with a one-line error naming them (`action` "refuse"), or left out and logged
    ("drop"): pre-training on them would learn sensitive images without noise."""
    duplicates = cached_duplicates(sensitive, public, cache_dir, device)
    if not duplicates:
        return public
    shown = ", ".join(f"public #{d.public} ~ {d.split} #{d.sensitive}" + (" exactly" if d.distance == 0 else f" at {d.distance:.3f}")
                      for d in duplicates[:5])
    more = ", ..." if len(duplicates) > 5 else ""
    count = f"{len(duplicates)} image{'s' if len(duplicates) > 1 else ''} that duplicate{'' if len(duplicates) > 1 else 's'}"
    if action == "drop":
        flagged = sorted({d.public for d in duplicates})
        log.warning("public set %s: left out %d image(s) that duplicate sensitive %s images (%s%s)", public_name,
                    len(flagged), sensitive_name, shown, more)
        return public.subset(np.setdiff1d(np.arange(len(public)), flagged), name=f"{public.name} (less {len(flagged)} duplicates)")
    raise PrivbenchError(
        f"public set {public_name} holds {count} sensitive {sensitive_name} images ({shown}{more}): pre-training would "
        f"learn them without noise; leave them out with --set data.public_duplicates=drop, remove them from the public "
        f"set, or pick another with --set public=NAME"
    )
