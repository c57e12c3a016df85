"""How a run computes on its device: precision, memory layout, compilation, physical batch size.

These settings change speed, and (bf16) the last bits of the numbers, never what is computed or what
is private: the privacy accounting, the clipping norms and the noise stay in float32 whatever the
precision (bf16 autocast covers the network's forward only; per-sample gradients are cast to float32
before their norms are taken). `fp32`, no channels-last and no compilation reproduce the earlier
runs bit for bit, so a run at those defaults keeps its configuration hash (see RunConfig.digest).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from privbench.checks import FLAG, check_fields, one_of
from privbench.errors import PrivbenchError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ComputeConfig:
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward pass; accounting and clipping stay fp32)
    channels_last: bool = False  # NHWC convolutions (faster on tensor cores)
    compile: bool = False  # torch.compile the non-private training and the sampler (not DP-SGD: Opacus' hooks)

    def validate(self, where: str = "compute.") -> None:
        check_fields(self, where, precision=one_of(tuple(PRECISIONS)), channels_last=FLAG, compile=FLAG)


def autocast(device: torch.device, compute: ComputeConfig) -> contextlib.AbstractContextManager:
    """The forward pass's precision: bf16 autocast, or nothing at fp32."""
    dtype = PRECISIONS[compute.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def lay_out(model: nn.Module, compute: ComputeConfig) -> nn.Module:
    """The model in the configured memory layout (in place; returned for chaining)."""
    return model.to(memory_format=torch.channels_last) if compute.channels_last else model


def in_layout(t: torch.Tensor, compute: ComputeConfig) -> torch.Tensor:
    """An image batch [B, C, H, W] in the configured layout; other tensors (labels) as they are."""
    return t.contiguous(memory_format=torch.channels_last) if compute.channels_last and t.dim() == 4 else t


def compiled(model: nn.Module, compute: ComputeConfig) -> nn.Module:
    """`torch.compile(model)` when configured; the original module otherwise. Parameters are shared,
    so training the compiled module trains `model`."""
    return torch.compile(model) if compute.compile else model


def largest_fitting_batch(try_batch: Callable[[int], None], limit: int, start: int = 8) -> int:
    """The largest power-of-two batch (at most `limit`, which is always tried last) for which
    `try_batch(b)` (one forward and backward) does not run out of device memory.

    Used to choose DP-SGD's physical batch, which bounds memory only: the logical batch, and so the
    privacy and the result, do not depend on it.
    """
    fitting, b = 0, min(start, limit)
    while True:
        try:
            try_batch(b)
        except torch.OutOfMemoryError:
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        fitting = b
        if b >= limit:
            break
        b = min(2 * b, limit)
    if fitting == 0:
        raise PrivbenchError(f"even a physical batch of {min(start, limit)} examples does not fit in device memory: "
                             "use a smaller model or --set params.dp.physical_batch=1")
    return fitting
