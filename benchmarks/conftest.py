"""pytest-benchmark micro-benchmarks of privbench's CPU paths; not part of the test suite.

`python -m pytest benchmarks --benchmark-enable` times them (pyproject's addopts disable timing, so
without the flag each benchmark runs once, as a plain correctness check). The default
`python -m pytest` never collects this folder: pyproject's testpaths is ["tests"]. See README.md.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch


def _versions() -> dict[str, str]:
    import opacus
    import scipy

    return {"torch": torch.__version__, "opacus": opacus.__version__, "numpy": np.__version__, "scipy": scipy.__version__}


def pytest_report_header(config) -> str:
    """What the timings depend on besides the code: the threads and the library versions."""
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    return f"benchmarks: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; {versions}"


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Saved runs (--benchmark-autosave) carry the same facts, so --benchmark-compare can be read."""
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["libraries"] = _versions()


@pytest.fixture(autouse=True)
def _quiet():
    """Opacus' per-batch warnings (hooks on module outputs, CPU autocast) would flood the table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
