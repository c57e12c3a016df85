"""Compute cost per stage of a run: wall and device seconds, peak host and device memory, parameters.

    costs = CostRecorder()
    with costs.stage("pretrain", device) as stage:
        model = train(...)
        stage.params = model
    costs.reused("query", cached_cost)   # work taken from a cache keeps the cost it had when it ran
"""

from __future__ import annotations

import functools
import platform
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

COST_FIELDS = ("device", "device_name", "wall_s", "device_s", "peak_host_bytes", "peak_device_bytes", "params")
SAMPLE_INTERVAL_S = 0.05


def _count(params: nn.Module | int | None) -> int | None:
    if isinstance(params, nn.Module):
        return sum(p.numel() for p in params.parameters())
    return None if params is None else int(params)


def _host_memory() -> tuple[int | None, int]:
    """(current RSS, lifetime peak RSS) of this process in bytes; current is None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return None, peak if platform.system() == "Darwin" else peak * 1024


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


class _PeakHostMemory:
    """The peak RSS over a block.

    A background thread samples the current RSS every 50 ms, so a spike shorter than that can be
    missed. When the block raises the process's lifetime peak (VmHWM), that peak is exact and used.
    """

    def __init__(self):
        self.peak, self._hwm_start = _host_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._update(_host_memory()[0])

    def _update(self, rss: int | None):
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        rss, hwm = _host_memory()
        self._update(rss)
        if hwm > self._hwm_start:
            self._update(hwm)
        return self.peak


@dataclass
class Stage:
    """The handle a `stage` block gets: set `params` to a module or a count to record its size."""

    name: str
    params: nn.Module | int | None = None


class CostRecorder:
    """Records the cost of named, non-overlapping stages; each name may be recorded once."""

    def __init__(self):
        self._records: list[dict] = []
        self._open: str | None = None

    def _claim(self, name: str) -> None:
        if any(r["name"] == name for r in self._records) or name == self._open:
            raise ValueError(f"cost stage {name!r} is recorded twice; give each stage its own name")

    @contextmanager
    def stage(self, name: str, device: torch.device | str = "cpu") -> Iterator[Stage]:
        """Measure the block. Stages do not nest: the device's peak-memory counter is shared."""
        self._claim(name)
        if self._open is not None:
            raise ValueError(f"cost stage {name!r} opened inside stage {self._open!r}; stages do not nest")
        device = torch.device(device)
        cuda = device.type == "cuda"
        handle = Stage(name)
        self._open = name
        try:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
            host = _PeakHostMemory()
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                yield handle
                if cuda:
                    end_event.record()
                    torch.cuda.synchronize(device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finally:
                peak_host = host.stop()
        finally:
            self._open = None
        self._records.append(
            {
                "name": name,
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
                "wall_s": wall,
                # CUDA: GPU time between the stage's start and end on the current stream (elapsed, not
                # utilisation). CPU: the process's CPU time over all threads, since the CPU is the device.
                "device_s": start_event.elapsed_time(end_event) / 1000 if cuda else cpu,
                "peak_host_bytes": peak_host,
                "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                "params": _count(handle.params),
                "reused": False,
            }
        )

    def parameters(self, name: str, params: nn.Module | int) -> None:
        """Set the parameter count of a recorded stage."""
        for record in self._records:
            if record["name"] == name:
                record["params"] = _count(params)
                return
        raise KeyError(f"no cost stage {name!r}")

    def reused(self, name: str, original: dict) -> None:
        """Record a stage whose result came from a cache: it keeps the cost of the run that computed it."""
        self._claim(name)
        if missing := [k for k in COST_FIELDS if k not in original]:
            raise ValueError(f"original cost of stage {name!r} lacks {', '.join(missing)}")
        self._records.append({"name": name, **{k: original[k] for k in COST_FIELDS}, "reused": True})

    def records(self) -> list[dict]:
        return [dict(r) for r in self._records]

    def to_dict(self) -> dict:
        return {"stages": self.records()}

    @classmethod
    def from_dict(cls, data: dict) -> "CostRecorder":
        recorder = cls()
        recorder._records = [dict(r) for r in data["stages"]]
        return recorder
