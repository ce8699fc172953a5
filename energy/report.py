"""Tables (CSV, markdown) and a PNG of stacked bars from ``Measurement`` rows.

Rows are plain dicts (``Measurement.row()`` plus whatever keys the caller adds, e.g. ``method`` and
``scenario``), so a report can be rebuilt from a saved CSV/JSON without rerunning anything.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .harness import PHASES


def write_csv(rows: list[dict], path: Path) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys or ["label"])
        w.writeheader()
        w.writerows(rows)
    return path


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(rows: list[dict], *, baselines: tuple[str, ...] = ("vanilla", "hsl", "edgellm"),
                   ours: str = "pipesd") -> str:
    """Per scenario: edge and cloud J per output token (mean ± 95% CI), the edge's phase split, and
    the change of each PipeSD method (``ours`` and its variants: ``pipesd_model``, ``pipesd:cloud_cost``)
    against each baseline."""
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        sr = [r for r in rows if r["scenario"] == scenario]
        out.append(f"#### {scenario}\n")
        out.append("| method | edge J/token (net) | edge gross | cloud J/token (net) | "
                   + " | ".join(PHASES) + " | TPT ms | reps |")
        out.append("|---" * (6 + len(PHASES)) + "|")
        for r in sr:
            out.append(f"| {r['method']} | {_f(r['edge_j_per_token'])} ± {_f(r['edge_j_per_token_ci95'])} | "
                       f"{_f(r['edge_gross_j_per_token'])} | "
                       f"{_f(r['cloud_j_per_token'], 4)} ± {_f(r['cloud_j_per_token_ci95'], 4)} | "
                       + " | ".join(_f(r[f"edge_{p}_j_per_token"]) for p in PHASES)
                       + f" | {_f(r.get('tpt_ms'), 1)} | {r['repetitions']} |")
        for mine in (r for r in sr if r["method"] == ours or r["method"].startswith((ours + ":", ours + "_"))):
            for b in baselines:
                base = next((r for r in sr if r["method"] == b), None)
                if base:
                    out.append(f"\n{mine['method']} vs {b}: edge "
                               f"{_change(mine['edge_j_per_token'], base['edge_j_per_token'])}, "
                               f"cloud {_change(mine['cloud_j_per_token'], base['cloud_j_per_token'])}")
        out.append("")
    methods = sorted({(r["side"], r["meter"]) for r in _labels(rows)})
    out.append("Meters: " + "; ".join(f"{side}: {m}" for side, m in methods))
    return "\n".join(out) + "\n"


def _labels(rows: list[dict]) -> list[dict]:
    seen = []
    for r in rows:
        seen.append({"side": "edge", "meter": r["edge_method"]})
        if r.get("cloud_method"):
            seen.append({"side": "cloud", "meter": r["cloud_method"]})
    return seen


def _change(ours: float, base: float) -> str:
    if not base or math.isnan(base) or math.isnan(ours):
        return "-"
    return f"{100 * (ours - base) / base:+.1f}%"


def plot(rows: list[dict], path: Path) -> Path | None:
    """Stacked bars per method and scenario: the edge's phases, and the cloud beside them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4.2), squeeze=False, sharey=True)
    colors = dict(zip(PHASES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")))
    for ax, scenario in zip(axes[0], scenarios):
        sr = [r for r in rows if r["scenario"] == scenario]
        x = range(len(sr))
        bottom = [0.0] * len(sr)
        for p in PHASES:
            vals = [max(0.0, r[f"edge_{p}_j_per_token"] or 0.0) for r in sr]
            ax.bar([i - 0.2 for i in x], vals, 0.4, bottom=bottom, color=colors[p], label=f"edge: {p}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        cloud = [0.0 if math.isnan(r["cloud_j_per_token"]) else r["cloud_j_per_token"] for r in sr]
        ax.bar([i + 0.2 for i in x], cloud, 0.4, color="#222222", label="cloud (net)")
        ax.set_xticks(list(x), [r["method"] for r in sr], rotation=45, ha="right")
        ax.set_title(scenario)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("J per output token (net of idle)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("J per output token: edge phases (left), cloud (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
