"""Helpers shared by tests that need a results database without running anything."""

import math

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
