"""The canary audit table (leaderboards/audit/): one row per canary run, its one-run bounds beside the
ledger's epsilon, what ideal canaries could show in the same mechanism, and the mechanism checks.

Canary runs train with canaries, so they are never scored: the leaderboards leave them out
(privbench.report.tables.is_canary_run) and this table shows nothing else.
"""

from __future__ import annotations

import json

import pandas as pd
from tabulate import tabulate

from privbench.attacks.canaries import THREAT_MODELS
from privbench.errors import PrivbenchError
from privbench.metrics.names import EPS_LB_CANARY
from privbench.report.tables import is_canary_run, provenance
from privbench.store import Store

KEYS = ("dataset", "method", "preset", "seed", "target_epsilon")


def canary_rows(outs: list[str]) -> pd.DataFrame:
    """Every canary run of the databases under `outs`, flattened from its canaries.json and costs."""
    rows = []
    for out in outs:
        store = Store(out)
        runs = store.runs()
        costs = store.costs()
        for _, run in runs[is_canary_run(runs)].iterrows():
            report = json.loads((store.run_dir(run["run_id"]) / "canaries.json").read_text())
            row = {k: run[k] for k in KEYS} | {"epsilon": run["epsilon"], EPS_LB_CANARY: run[EPS_LB_CANARY]}
            for kind in THREAT_MODELS:
                bound = report["threat_models"].get(kind)
                if bound is not None:
                    row |= {f"{kind}_eps_lb": bound["epsilon"], f"{kind}_canaries": bound["canaries"],
                            f"{kind}_correct": bound["correct"], f"{kind}_guesses": bound["guesses_in"] + bound["guesses_out"],
                            f"{kind}_ideal": bound["ideal"], f"{kind}_ceiling": bound["ceiling"]}
            mechanism = report["mechanism"]
            row |= {"sample_rate": mechanism["sample_rate"], "noise_multiplier": mechanism["noise_multiplier"],
                    "steps": mechanism["steps"]}
            for name, check in report["mechanism_checks"]["checks"].items():
                row[f"{name}_measured"] = check["measured"]
                row[f"{name}_fails"] = check["fails"]
                if name == "influence":
                    row["unclipped_norm_ratio"] = check["unclipped_norm_ratio"]
                if name == "clipped_sum":
                    row["clipped_sum_bound"] = check["bound"]
            stages = costs[costs["run_id"] == run["run_id"]].set_index("stage")["wall_s"]
            row["dp_train_s"] = stages.get("dp-train", stages.get("fit"))
            row |= {k: run[k] for k in ("run_id", "config_hash", "commit_id", "device", "delta")}
            rows.append(row)
    if not rows:
        raise PrivbenchError(f"no canary runs in {', '.join(outs)}: run e.g. `privbench run --method dpdm --eps 1 "
                             "--preset smoke --set audit.canaries=5000 --set audit.canary_examples=64`")
    return pd.DataFrame(rows).sort_values(list(KEYS)).reset_index(drop=True)


def _bound(row: pd.Series, kind: str) -> str:
    if pd.isna(row.get(f"{kind}_eps_lb")):
        return "-"
    return (f"{row[f'{kind}_eps_lb']:.2f} ({int(row[f'{kind}_correct'])}/{int(row[f'{kind}_guesses'])}; "
            f"ideal {row[f'{kind}_ideal']:.2f}, ceiling {row[f'{kind}_ceiling']:.2f})")


def _checks(row: pd.Series) -> str:
    parts = []
    if "sample_rate_measured" in row and pd.notna(row["sample_rate_measured"]):
        parts.append(f"q {row['sample_rate_measured']:.3f}/{row['sample_rate']:.3f}")
        parts.append(f"σ {row['noise_measured']:.2f}/{row['noise_multiplier']:.2f}")
    if "influence_measured" in row and pd.notna(row["influence_measured"]):
        parts.append(f"influence {row['influence_measured']:.2f} C (norms {row['unclipped_norm_ratio']:.3g} C)")
    if "clipped_sum_measured" in row and pd.notna(row["clipped_sum_measured"]):
        parts.append(f"‖sum‖ {row['clipped_sum_measured']:.4g}/{row['clipped_sum_bound']:.4g} C")
    failed = [name for name in ("sample_rate", "noise", "influence", "clipped_sum") if row.get(f"{name}_fails") is True]
    return "; ".join(parts) + (f"; FAILED: {', '.join(failed)}" if failed else "")


def render_canary_table(rows: pd.DataFrame, fmt: str = "md") -> str:
    """md: one line per run, each bound as `bound (right/guesses; ideal, ceiling)`; csv: every number."""
    if fmt == "csv":
        return rows.to_csv(index=False)
    table = pd.DataFrame({
        "method": rows["method"], "preset": rows["preset"], "seed": rows["seed"],
        "ε spent": rows["epsilon"].map(lambda e: f"{e:.3g}"),
        "ε_lb canary": [f"{v:.2f}" + (" (ε_lb > ε: accounting failure)" if v > e else "")
                        for v, e in zip(rows[EPS_LB_CANARY], rows["epsilon"])],
        **{f"{kind} bound": [_bound(r, kind) for _, r in rows.iterrows()] for kind in THREAT_MODELS},
        "measured / recorded": [_checks(r) for _, r in rows.iterrows()],
        "DP-SGD s": rows["dp_train_s"].map(lambda s: "-" if pd.isna(s) else f"{s:.0f}"),
    })
    body = tabulate(table, headers="keys", showindex=False, tablefmt="github" if fmt == "md" else "latex_booktabs")
    return f"{body}\n\n_{provenance(rows)}_\n" if fmt == "md" else f"{body}\n% {provenance(rows)}\n"
