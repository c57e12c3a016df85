"""`privbench bench`: the throughput of every costly stage of a diffusion method on one device, and
that method's `paper` preset cost projected from it.

  measure     what is timed: each stage's steps (DP-SGD through the engine's own DPSGDPhase)
  projection  the paper preset's workload, stage by stage, times the measured seconds per row
  report      markdown tables with provenance, appended to the perf log
"""

from __future__ import annotations

from dataclasses import replace

from privbench.bench.measure import BenchOptions, BenchReport, Measurement, measure_stages, resolve_options
from privbench.bench.projection import PaperWorkload, RowCosts, StageProjection, paper_workload, project, row_costs
from privbench.bench.report import append_report, render, to_json


def run_bench(options: BenchOptions) -> BenchReport:
    """Measure every stage of `options.method` and, at the paper preset, project its cost."""
    report = measure_stages(resolve_options(options))
    if report.options.preset != "paper":
        return report
    workload = paper_workload(report.options.method)
    return replace(report, projection=project(workload, row_costs(report, workload.grad_sample_mode)))


__all__ = ["BenchOptions", "BenchReport", "Measurement", "PaperWorkload", "RowCosts", "StageProjection",
           "append_report", "paper_workload", "project", "render", "row_costs", "run_bench", "to_json"]
