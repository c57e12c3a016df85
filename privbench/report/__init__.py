"""Tables, plots and image grids, generated only from stored results."""

from privbench.report.grids import sample_grid
from privbench.report.tables import leaderboard, render

__all__ = ["leaderboard", "render", "sample_grid"]
