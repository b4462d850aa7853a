"""How the trajectories a method picks fail, per family: the generalisation test runs' failure endings.

For greedy and every Best-of-N (N > 1) / beam method of the evaluation runs (``episodes.jsonl`` of ``python -m
agentrm.search``; ``--join`` as in ``bench/generalisation_report.py``), per environment family: the picked
trajectories' success, mean length of successes and of failures, how many failures **ended before the
environment's step limit** (the episode was lost or ended by an action, not cut at ``max_steps``), and the first
word of the failures' last actions (the most common three). Outcome-blind scorers never read the reply that ends
an episode, so a failure that ends early on an action that looks like progress (e.g. cooking an ingredient the
recipe wanted roasted) reads to them like a finished task.

    python bench/generalisation_failures.py runs/generalisation/backbones/test_eval/{babyai,textworld,sciworld} \\
        --md runs/generalisation/backbones/test_eval/failures.md
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentrm.search.compare import method_label  # noqa: E402
from bench.generalisation_report import _method_order, family, family_order, join_rows, read_rows  # noqa: E402


@cache
def step_limit(spec: str) -> int | None:
    """The environment's ``max_steps`` (given in the spec or its default), ``None`` when it has none."""
    from agentrm.envs.registry import make_env

    return getattr(make_env(spec), "max_steps", None)


def failure_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (family, method) over the picked trajectories (rows with ``actions``); Best-of-1 is left
    out (it picks the first sample: greedy's trajectory)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["method"] in ("greedy", "best_of_n", "beam") and r.get("actions") is not None and r.get("n") != 1:
            groups[(family(r), method_label(r))].append(r)
    out = []
    for (fam, label), picked in sorted(groups.items(), key=lambda kv: (family_order(kv[0][0]),
                                                                      _method_order(kv[0][1]))):
        wins = [r for r in picked if r["success"]]
        fails = [r for r in picked if not r["success"]]
        early = [r for r in fails if (limit := step_limit(r["env"])) is None or len(r["actions"]) < limit]
        verbs = Counter(r["actions"][-1].split()[0] if r["actions"] and r["actions"][-1].split() else "(none)"
                        for r in fails)
        out.append({"family": fam, "method": label, "picked": len(picked), "success": len(wins) / len(picked),
                    "steps_success": sum(len(r["actions"]) for r in wins) / len(wins) if wins else None,
                    "steps_failure": sum(len(r["actions"]) for r in fails) / len(fails) if fails else None,
                    "failures": len(fails), "failures_early": len(early), "last_actions": verbs.most_common(3)})
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    def num(x):
        return "–" if x is None else f"{x:.1f}"

    lines = ["| family | method | picked | success | mean steps: success / failure | failures ended before the "
             "step limit | failures' last actions (first word) |", "|---|---|---:|---:|---|---:|---|"]
    for s in summary:
        verbs = ", ".join(f"{v} {n}" for v, n in s["last_actions"]) or "–"
        lines.append(f"| {s['family']} | {s['method']} | {s['picked']} | {s['success']:.3f} | "
                     f"{num(s['steps_success'])} / {num(s['steps_failure'])} | "
                     f"{s['failures_early']} of {s['failures']} | {verbs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="evaluation output directories (each with episodes.jsonl)")
    ap.add_argument("--join", type=Path, nargs="*", default=[],
                    help="other runs whose Best-of-N / beam rows on the same episodes join the table")
    ap.add_argument("--md", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)
    text = markdown(failure_rows(join_rows(read_rows(args.runs), args.join)))
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    return text


if __name__ == "__main__":
    main()
