"""Helpers shared by tests: a results database without running anything, stand-in encoders, and the
device that the DP engine's device-parametrised tests run on."""

import math
import os

import pytest
import torch
from torch import nn

from privbench.store import Store


def _record_fake_run(store: Store, method: str, eps: float, seed: int, metrics: dict[str, float], dataset: str = "cifar10",
                    config_hash: str | None = None, epsilon: float | None = None) -> str:
    """Record a finished run with the given metric values (no details, no costs); returns its run id."""
    run_id = f"{method}-eps{eps:g}-seed{seed}"
    run_dir = store.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {
        "run_id": run_id, "method": method, "dataset": dataset, "preset": "smoke", "seed": seed,
        "target_epsilon": eps, "epsilon": epsilon if epsilon is not None else (eps if math.isinf(eps) else 0.99 * eps),
        "delta": 1e-5, "accountant": "prv", "config_hash": config_hash or f"h{method}{eps:g}", "config": "{}",
        "commit_id": "0123abcd", "device": "cpu", "finished": "2026-01-01T00:00:00+00:00", "run_dir": str(run_dir),
    }
    store.record(run, {name: (value, {}) for name, value in metrics.items()}, [])
    return run_id


@pytest.fixture(scope="session")
def record_run():
    """`record_run(store, method, eps, seed, {metric: value}, ...)` records a fake finished run."""
    return _record_fake_run


class StandInEncoder(nn.Module):
    """A stand-in for a DINOv2 ViT: [N, 3, 224, 224] -> [N, 6]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=16, stride=16)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture
def dinov2_stand_in(tmp_path):
    """(the stand-in, the TorchScript file it is saved in)."""
    torch.manual_seed(0)
    model = StandInEncoder().eval()
    path = tmp_path / "stand-in.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return model, path


TEST_DEVICE = "PRIVBENCH_TEST_DEVICE"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the device-parametrised tests put their models and tensors: $PRIVBENCH_TEST_DEVICE (cpu by
    default, so that the default run covers the CPU side; `privbench gpu-check` sets cuda)."""
    name = os.environ.get(TEST_DEVICE, "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"{TEST_DEVICE}={name} is not a device: use cpu or cuda[:N]") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{TEST_DEVICE}={name}, but no CUDA device is visible here")
    return chosen


@pytest.fixture
def ieee_float32():
    """float32 products as float32 while the test runs: no TF32 in CUDA's matrix products and cuDNN's
    convolutions (TF32 keeps 10 mantissa bits, errors ~5e-4 relative, which would hide an algorithm's
    error under the hardware's). Training keeps PyTorch's defaults; so do the tests that do not ask for this."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
