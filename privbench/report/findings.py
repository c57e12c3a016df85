"""Sentences generated from a board's runs: does each method pay for privacy as it should, and does
a paper's ordering of methods hold.

Every number in them is computed from the runs, never written by hand. A difference between two
cells is called *within the seeds' spread* when |mean_a - mean_b| is at most std_a + std_b (sample
standard deviations over seeds); with a single seed no spread is known, and the sentence says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from privbench.report.tables import format_eps

# metric -> (label, scale, decimals, higher is better)
METRICS = {"ca": ("CA %", 100.0, 1, True), "fid": ("FID", 1.0, 1, False)}
# The claim of PrivImage (Li, Gong et al., USENIX Security 2024): pre-training on the public semantics
# a private query selects beats pre-training on all public data (PDP-Diffusion), which beats none (DPDM).
PAPER_ORDER = ("privimage", "pdp-diffusion", "dpdm")


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float  # NaN with one seed
    seeds: int

    def text(self, scale: float, decimals: int) -> str:
        if self.seeds < 2:
            return f"{self.mean * scale:.{decimals}f}"
        return f"{self.mean * scale:.{decimals}f} ± {self.std * scale:.{decimals}f}"


def cells(runs: pd.DataFrame, metric: str) -> dict[tuple[str, str, float], Cell]:
    """(method, preset, target epsilon) -> mean and sample std of `metric` over seeds."""
    if metric not in runs:
        return {}
    values = runs.dropna(subset=[metric])
    stats = values.groupby(["method", "preset", "target_epsilon"])[metric].agg(["mean", "std", "count"])
    return {key: Cell(row["mean"], row["std"], int(row["count"])) for key, row in stats.iterrows()}


def _gap(better: Cell, worse: Cell, scale: float, decimals: int) -> str:
    """'by 3.1 (spread 1.2)', or 'by 0.4, within the seeds' spread 1.2', or '(one seed: spread unknown)'."""
    gap = abs(better.mean - worse.mean) * scale
    if better.seeds < 2 or worse.seeds < 2:
        return f"by {gap:.{decimals}f} (one seed: spread unknown)"
    spread = (better.std + worse.std) * scale
    if gap <= spread:
        return f"by {gap:.{decimals}f}, within the seeds' spread {spread:.{decimals}f}"
    return f"by {gap:.{decimals}f} (spread {spread:.{decimals}f})"


def _ranked(items: list[tuple[str, Cell]], metric: str) -> tuple[bool, list[str], list[str]]:
    """Whether `items` (in the claimed order, best first) are ordered by `metric`; the sentence parts
    comparing each neighbouring pair; the pairs that break the order."""
    label, scale, decimals, higher = METRICS[metric]
    holds, parts, broken = True, [], []
    for (name_a, a), (name_b, b) in zip(items, items[1:]):
        ahead = a.mean > b.mean if higher else a.mean < b.mean
        holds &= ahead
        parts.append(f"{name_a} {'ahead of' if ahead else 'behind'} {name_b} {_gap(a, b, scale, decimals)}")
        if not ahead:
            broken.append(f"{name_a} vs {name_b}")
    return holds, parts, broken


def privacy_price(runs: pd.DataFrame) -> list[str]:
    """Per method and preset: CA should order eps inf > largest > ... > smallest epsilon, FID the reverse."""
    sentences = []
    for metric, (label, scale, decimals, _) in METRICS.items():
        table = cells(runs, metric)
        for method, preset in sorted({(m, p) for m, p, _ in table}):
            epsilons = sorted((e for m, p, e in table if (m, p) == (method, preset)), reverse=True)
            if len(epsilons) < 2:
                continue
            items = [(f"ε={format_eps(e)}", table[method, preset, e]) for e in epsilons]
            holds, parts, broken = _ranked(items, metric)
            values = ", ".join(f"{name} {cell.text(scale, decimals)}" for name, cell in items)
            verdict = "ordered by the budget" if holds else f"NOT ordered by the budget ({'; '.join(broken)})"
            sentences.append(f"{method} ({preset}), {label}: {values}; {verdict}: {'; '.join(parts)}.")
    return sentences


def paper_ordering(runs: pd.DataFrame, order: tuple[str, ...] = PAPER_ORDER) -> list[str]:
    """At each finite epsilon and preset where every method of `order` ran: whether the order holds."""
    sentences = []
    for metric, (label, scale, decimals, _) in METRICS.items():
        table = cells(runs, metric)
        for preset, epsilon in sorted({(p, e) for _, p, e in table if not math.isinf(e)}):
            if not all((m, preset, epsilon) in table for m in order):
                continue
            items = [(m, table[m, preset, epsilon]) for m in order]
            holds, parts, _ = _ranked(items, metric)
            values = ", ".join(f"{m} {cell.text(scale, decimals)}" for m, cell in items)
            claim = " > ".join(order)
            sentences.append(f"{label} at ε={format_eps(epsilon)} ({preset}): the paper's ordering {claim} "
                             f"{'holds' if holds else 'does NOT hold'}: {'; '.join(parts)} ({values}).")
    return sentences
