"""Paired comparisons of search methods on the same episodes, with bootstrap confidence intervals.

Every method of an evaluation plays the same episodes (same environment seed, same policy seed),
so the honest measure of "Best-of-5 beats greedy" is the per-episode difference in success
``d_e = success_A(e) - success_B(e)``, averaged over the episodes, with a confidence interval
from a paired bootstrap over episodes (resampling episodes, not the methods independently).
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    "env_set",
    "method",
    "baseline",
    "episodes",
    "method_success",
    "baseline_success",
    "difference",
    "ci_low",
    "ci_high",
    "wins",
    "losses",
)


def method_label(row: dict[str, Any]) -> str:
    """``greedy``, ``best_of_n[value_rm]@5``, ``beam[value_rm]W2K4``, ``sampling@8`` ..."""
    m = row["method"]
    if m == "greedy":
        return "greedy"
    if m == "best_of_n":
        return f"best_of_n[{row['scorer']}]@{row['n']}"
    if m == "beam":
        return f"beam[{row['scorer']}]W{row['w']}K{row['k']}"
    if m == "pass@N":
        return f"pass@{row['n']}"
    return f"{m}@{row['n']}" if row.get("n") else m


def bootstrap_ci(
    diffs: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (deterministic for a seed)."""
    n = len(diffs)
    if n == 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def with_scorer(label: str, scorer: str) -> str:
    """The same search method guided by another scorer: ``best_of_n[a]@5`` -> ``best_of_n[b]@5``."""
    head, rest = label.split("[", 1)
    return f"{head}[{scorer}]{rest.split(']', 1)[1]}"


def episode_success(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple[str, int], float]]:
    """``(env set, method label) -> (env, episode) -> success`` of the greedy, Best-of-N and beam rows: what the
    paired comparisons pair."""
    success: dict[tuple[str, str], dict[tuple[str, int], float]] = defaultdict(dict)
    for r in rows:
        if r["method"] in ("greedy", "best_of_n", "beam"):
            success[(r["env_set"], method_label(r))][(r["env"], r["episode"])] = float(r["success"])
    return success


def paired_comparisons(
    rows: Sequence[dict[str, Any]], level: float = 0.95, resamples: int = 2000, seed: int = 0,
    reference_scorer: str | None = None,
) -> list[dict[str, Any]]:
    """Each Best-of-N and beam method against greedy and against Best-of-1 of the same scorer.

    Args:
        rows: per-episode rows of :func:`agentrm.search.evaluate.evaluate` (``episodes.jsonl``).
        level: confidence level of the interval on the mean difference.
        reference_scorer: also compare every other scorer's method with the same method (same ``N``, or same
            beam ``W``, ``K``) guided by this scorer, e.g. a pretrained RM's Best-of-5 against the tiny RM's
            (Best-of-1 is left out: it is the first sample whatever the scorer).

    Returns:
        One row per (env set, method, baseline) with both success rates, the mean paired
        difference, its bootstrap interval and the number of episodes won and lost.
    """
    success = episode_success(rows)
    out = []
    for (env_set, label), a in sorted(success.items()):
        if label == "greedy":
            continue
        baselines = ["greedy"]
        if label.startswith("best_of_n[") and not label.endswith("@1"):
            baselines.append(label.rsplit("@", 1)[0] + "@1")
        if reference_scorer is not None and "[" in label and not label.endswith("@1"):
            reference = with_scorer(label, reference_scorer)
            if reference != label:
                baselines.append(reference)
        for base in baselines:
            b = success.get((env_set, base))
            if not b:
                continue
            keys = sorted(set(a) & set(b))
            if not keys:
                continue
            diffs = [a[k] - b[k] for k in keys]
            lo, hi = bootstrap_ci(diffs, level, resamples, seed)
            out.append(
                {
                    "env_set": env_set,
                    "method": label,
                    "baseline": base,
                    "episodes": len(keys),
                    "method_success": sum(a[k] for k in keys) / len(keys),
                    "baseline_success": sum(b[k] for k in keys) / len(keys),
                    "difference": sum(diffs) / len(diffs),
                    "ci_low": lo,
                    "ci_high": hi,
                    "wins": sum(d > 0 for d in diffs),
                    "losses": sum(d < 0 for d in diffs),
                }
            )
    return out


def comparisons_markdown(comparisons: Sequence[dict[str, Any]], level: float = 0.95) -> str:
    """A Markdown table: difference in success with its interval, per env set and method."""
    lines = [
        f"| env set | method | baseline | episodes | method | baseline | difference [{level:.0%} CI] | won / lost |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['env_set']} | {c['method']} | {c['baseline']} | {c['episodes']} | {c['method_success']:.3f} "
            f"| {c['baseline_success']:.3f} | {c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
            f"| {c['wins']} / {c['losses']} |"
        )
    return "\n".join(lines) + "\n"


def write_comparisons(comparisons: Sequence[dict[str, Any]], out_dir: str | Path) -> None:
    """``comparisons.csv`` and ``comparisons.md`` in ``out_dir``."""
    out = Path(out_dir)
    with open(out / "comparisons.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for c in comparisons:
            w.writerow({k: c[k] for k in COLUMNS})
    (out / "comparisons.md").write_text(comparisons_markdown(comparisons))
