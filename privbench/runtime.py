"""What every entry point sets up the same way: console logging and the device a command runs on.

The CLI, sweep jobs (which run `privbench run`'s work in another process) and `privbench bench`
share these; keeping them out of cli.py lets those modules import them without importing the CLI.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from privbench.errors import PrivbenchError

if TYPE_CHECKING:
    import torch


def console_logging(verbose: bool, quiet: bool) -> None:
    """Other libraries speak only when they warn; privbench narrates its runs, one line per stage.

    The console handler sits on the `privbench` logger (replacing the one of an earlier call in the
    same process), so that a run's log file still gets every INFO line when the console is quiet.
    """
    logging.basicConfig(level=logging.WARNING)
    logger = logging.getLogger("privbench")
    for handler in [h for h in logger.handlers if getattr(h, "privbench_console", False)]:
        logger.removeHandler(handler)
    console = logging.StreamHandler()
    console.privbench_console = True
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    console.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.addHandler(console)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when visible, else CPU), `cpu` or `cuda[:N]` as a torch device, or the error that says why not."""
    import torch  # here, not at the top: the CLI imports this module before it knows it needs torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrivbenchError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise PrivbenchError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None
