"""Summaries of per-episode search results: grouped table (rich, CSV, Markdown) and the test-time scaling plot."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GROUP_KEYS = ("method", "scorer", "n", "w", "k", "env_set")
COLUMNS = (
    *GROUP_KEYS,
    "episodes",
    "success_rate",
    "avg_reward",
    "candidates_scored",
    "unscored",
    "tokens_scored",
    "scoring_path",
    "wall_s",
    "server_wait_s",
    "cache_evictions",
)
_METHOD_ORDER = {"greedy": 0, "sampling": 1, "pass@N": 2, "best_of_n": 3, "beam": 4}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, scorer, N, W, K, env set): success rate, mean reward, mean work per episode, total wall time."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in GROUP_KEYS)].append(r)
    out = []
    for key, rs in groups.items():
        n = len(rs)
        out.append(
            {
                **dict(zip(GROUP_KEYS, key)),
                "episodes": n,
                "success_rate": sum(float(r["success"]) for r in rs) / n,
                "avg_reward": sum(float(r["reward"]) for r in rs) / n,
                "candidates_scored": sum(r.get("candidates_scored", 0) for r in rs) / n,
                # share of the scored candidates without a score (nan, ranked last: a judge reply without a rating)
                "unscored": (sum(r.get("unscored", 0) for r in rs) / scored
                             if (scored := sum(r.get("candidates_scored", 0) for r in rs)) else None),
                "tokens_scored": sum(r.get("tokens_scored", 0) for r in rs) / n,
                # which scoring path the RM took (cached / packed / plain), as the scorer reported it
                "scoring_path": "+".join(sorted({p for r in rs for p in (r.get("scoring_path") or "").split("+") if p}))
                or None,
                "wall_s": sum(r.get("wall_s", 0.0) for r in rs),
                # time spent waiting for a scoring server's answers (remote scorers; 0 in process), a part of wall_s
                "server_wait_s": sum(r.get("server_wait_s", 0.0) for r in rs),
                # prefix-cache entries evicted (or too large to store) to keep the byte budget, summed
                "cache_evictions": sum(r.get("cache_evictions", 0) + r.get("cache_oversized", 0) for r in rs),
            }
        )
    out.sort(
        key=lambda r: (
            str(r["env_set"]),
            _METHOD_ORDER.get(r["method"], 9),
            str(r["scorer"]),
            r["n"] or 0,
            r["w"] or 0,
            r["k"] or 0,
        )
    )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_csv(summary: Sequence[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in summary:
            w.writerow({k: r.get(k) for k in COLUMNS})


def to_markdown(summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |" for r in summary]
    return "\n".join(lines) + "\n"


def print_table(summary: Sequence[dict[str, Any]], title: str = "search evaluation") -> None:
    """Print the summary with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("method", "scorer", "env_set") else "right")
    for r in summary:
        table.add_row(*(_fmt(r.get(k)) for k in COLUMNS))
    Console(width=200).print(table)


def plot_scaling(summary: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Success vs N per env set: Best-of-N per scorer, pass@N, and greedy/sampling/beam as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["env_set"] for r in summary})
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5.5 * max(1, len(sets)), 4.2), squeeze=False)
    for ax, ls in zip(axes[0], sets):
        rs = [r for r in summary if r["env_set"] == ls]
        curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rs:
            if r["method"] == "best_of_n":
                curves[f"Best-of-N ({r['scorer']})"].append((r["n"], r["success_rate"]))
            elif r["method"] == "pass@N":
                curves["pass@N (oracle: any sample succeeds)"].append((r["n"], r["success_rate"]))
        for label, pts in sorted(curves.items()):
            pts.sort()
            style = "k--" if label.startswith("pass@N") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, marker="o")
        for i, r in enumerate(x for x in rs if x["method"] in ("greedy", "sampling", "beam")):
            label = r["method"] if r["method"] != "beam" else f"beam W={r['w']} K={r['k']} ({r['scorer']})"
            ax.axhline(r["success_rate"], linestyle=":", color=f"C{(i + 5) % 10}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (sampled trajectories)")
        ax.set_ylabel("success rate")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{ls}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
