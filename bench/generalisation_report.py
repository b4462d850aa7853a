"""Per-family tables of the generalisation test evaluation (docs/generalisation.md, "Results").

``python -m agentrm.search`` pools every held-out spec into one ``held_out`` set; this script reads the
``episodes.jsonl`` of one or more evaluation runs (e.g. one per family, with different episode counts) and
reports per environment family (``babyai``, ``textworld``, ``sciworld``, and ``all``):

* success of every method (greedy, sampling, pass@N, Best-of-N and beam per scorer) with the episode count;
* paired differences with percentile-bootstrap 95% intervals against greedy and against Best-of-1 of the same
  scorer (:func:`agentrm.search.compare.paired_comparisons`, the harness's own statistics);
* mean wall seconds per episode and method (the evaluation cost);

and saves one PNG: per family, the paired difference to greedy of each Best-of-N / beam method with its interval.

    python bench/generalisation_report.py runs/generalisation/test_eval runs/generalisation/test_eval_sciworld \\
        --png docs/img/generalisation_test.png --md runs/generalisation/test_report.md

``--join`` adds other runs' Best-of-N / beam rows on the same episodes (checked: their greedy, sampling and pass
rows agree), ``--reference_scorer`` compares every other scorer's method with that scorer's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentrm.search.compare import comparisons_markdown, method_label, paired_comparisons  # noqa: E402
from bench.paper_common import figure  # noqa: E402

FAMILIES = ("babyai", "textworld", "sciworld", "all")
"""The report's order of families (``all``: pooled)."""


def family_order(name: str) -> int:
    """Position of a family (or an env spec's family) in :data:`FAMILIES`; unknown ones last."""
    name = name.split(":", 1)[0]
    return FAMILIES.index(name) if name in FAMILIES else len(FAMILIES)


def read_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Every row of each run's ``episodes.jsonl``; an episode (env, index) present in two runs is an error."""
    rows, seen = [], {}
    for d in run_dirs:
        path = d / "episodes.jsonl"
        if not path.is_file():
            raise SystemExit(f"generalisation_report: {path}: no such file (run python -m agentrm.search first)")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                key = (r["env"], r["episode"])
                if seen.setdefault(key, str(d)) != str(d):
                    raise SystemExit(f"generalisation_report: {path}:{line_no}: episode {key} is also in {seen[key]}")
                rows.append(r)
    return rows


def join_rows(rows: list[dict[str, Any]], join_dirs: list[Path]) -> list[dict[str, Any]]:
    """``rows`` plus the Best-of-N and beam rows of other runs **on the same episodes** (e.g. the LLM judge run on
    a subset of an RM evaluation's episodes: only those episodes are read). The policy's own rows (greedy,
    sampling, pass@N) must agree episode by episode, which checks that the runs played the same episodes; a
    method the main runs already have is theirs."""
    episodes = {(r["env"], r["episode"]) for r in rows}
    own = {(r["env"], r["episode"], method_label(r)): r["success"] for r in rows
           if r["method"] not in ("best_of_n", "beam")}
    labels = {method_label(r) for r in rows}
    joined = []
    for d in join_dirs:
        for r in read_rows([d]):
            key, label = (r["env"], r["episode"]), method_label(r)
            if key not in episodes:
                continue
            if r["method"] in ("best_of_n", "beam"):
                if label not in labels:
                    joined.append(r)
            elif own.get((*key, label), r["success"]) != r["success"]:
                raise SystemExit(f"generalisation_report: {d}: {label} of episode {key} succeeded {r['success']} there "
                                 f"and {own[(*key, label)]} in the main runs: not the same episodes")
    return rows + joined


def family(row: dict[str, Any]) -> str:
    return row["env"].split(":", 1)[0]


def by_family(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per family, plus ``all``; ``env_set`` is replaced by the family so the comparisons group by it."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[family(r)].append({**r, "env_set": family(r)})
        out["all"].append({**r, "env_set": "all"})
    return dict(out)


def success_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Methods x families: success (episodes) and mean wall seconds per episode."""
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    walls: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for fam, rows in groups.items():
        for r in rows:
            label = method_label(r)
            stats[label][fam].append(float(r["success"]))
            if r.get("wall_s") is not None:
                walls[label][fam].append(float(r["wall_s"]))
    fams = [f for f in FAMILIES if f in groups and f != "all"] + ["all"]
    head = "| method | " + " | ".join(f"{f}: success (episodes)" for f in fams) + " | " + \
        " | ".join(f"{f}: wall s/episode" for f in fams[:-1]) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(fams) - 1)]
    for label in sorted(stats, key=_method_order):
        cells = [f"{sum(v) / len(v):.3f} ({len(v)})" if (v := stats[label].get(f)) else "–" for f in fams]
        cost = [f"{sum(v) / len(v):.2f}" if (v := walls[label].get(f)) else "–" for f in fams[:-1]]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(cost) + " |")
    return "\n".join(lines) + "\n"


def unscored_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Methods x families: the share of scored candidates that got no score (``nan``, ranked last: a judge reply
    without a rating), from the rows' ``unscored`` / ``candidates_scored``; ``""`` when every candidate was scored."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for fam, rows in groups.items():
        for r in rows:
            if r.get("candidates_scored"):
                c = counts[method_label(r)][fam]
                c[0], c[1] = c[0] + int(r.get("unscored") or 0), c[1] + int(r["candidates_scored"])
    if not any(c[0] for fams in counts.values() for c in fams.values()):
        return ""
    fams = [f for f in FAMILIES if f in groups and f != "all"] + ["all"]
    lines = ["| method | " + " | ".join(f"{f}: unscored / scored" for f in fams) + " |", "|---|" + "---:|" * len(fams)]
    for label in sorted(counts, key=_method_order):
        cells = [f"{c[0] / c[1]:.2f} ({c[0]}/{c[1]})" if (c := counts[label].get(f)) else "–" for f in fams]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_spec_table(rows: list[dict[str, Any]]) -> str:
    """Task types (env specs) x the main methods: success rate (episodes in the first column)."""
    succ: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        label = method_label(r)
        if label.startswith("pass@") and not label.endswith("@5"):
            continue
        succ[r["env"]][label].append(float(r["success"]))
    labels = sorted({lab for d in succ.values() for lab in d if not lab.endswith("@1")}, key=_method_order)
    lines = ["| task type (spec) | episodes | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for env in sorted(succ, key=lambda e: (family_order(e), e)):
        d = succ[env]
        cells = [f"{sum(v) / len(v):.2f}" if (v := d.get(lab)) else "–" for lab in labels]
        lines.append(f"| `{env}` | {len(d['greedy'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _method_order(label: str) -> tuple[int, str]:
    for i, p in enumerate(("greedy", "sampling", "pass@", "best_of_n", "beam")):
        if label.startswith(p):
            return i, label
    return 9, label


def plot(comps: list[dict[str, Any]], path: Path) -> None:
    """Per family, each method's paired difference to greedy with its 95% interval."""
    vs = [c for c in comps if c["baseline"] == "greedy" and not c["method"].endswith("@1")]  # Best-of-1 = greedy
    fams = [f for f in FAMILIES if any(c["env_set"] == f for c in vs)]
    methods = sorted({c["method"] for c in vs}, key=_method_order)
    width = 0.8 / max(1, len(methods))
    with figure(path, (6.4, 3.4)) as (_, ax):
        for j, m in enumerate(methods):
            xs, ys, lo, hi = [], [], [], []
            for i, f in enumerate(fams):
                c = next((c for c in vs if c["env_set"] == f and c["method"] == m), None)
                if c is None:
                    continue
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(c["difference"])
                lo.append(c["difference"] - c["ci_low"])
                hi.append(c["ci_high"] - c["difference"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=m)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(fams)))
        ax.set_xticklabels([f"{f}\n(n={max(c['episodes'] for c in vs if c['env_set'] == f)}; beam: "
                            f"{min(c['episodes'] for c in vs if c['env_set'] == f)})" if any(
                                c["env_set"] == f and c["method"].startswith("beam") for c in vs) else
                            f"{f}\n(n={max(c['episodes'] for c in vs if c['env_set'] == f)})" for f in fams])
        ax.set_ylabel("success − greedy (paired, 95% CI)")
        ax.set_title("Unseen test task types: search guided by the RM vs greedy", fontsize=9)
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="evaluation output directories (each with episodes.jsonl)")
    ap.add_argument("--png", type=Path, default=None, help="where to save the figure")
    ap.add_argument("--md", type=Path, default=None, help="also write the Markdown here")
    ap.add_argument("--join", type=Path, nargs="*", default=[],
                    help="other runs whose Best-of-N / beam rows on the same episodes join the comparison")
    ap.add_argument("--reference_scorer", default=None,
                    help="also compare each other scorer's Best-of-N / beam with this scorer's (same N, W, K)")
    args = ap.parse_args(argv)
    rows = join_rows(read_rows(args.runs), args.join)
    groups = by_family(rows)
    comps = paired_comparisons([r for rows in groups.values() for r in rows], reference_scorer=args.reference_scorer)
    comps.sort(key=lambda c: (family_order(c["env_set"]), _method_order(c["method"]), c["baseline"]))
    text = "### Success per method and family\n\n" + success_table(groups) + \
        "\n### Paired differences (bootstrap over episodes)\n\n" + comparisons_markdown(comps) + \
        "\n### Success per task type\n\n" + per_spec_table(rows)
    if unscored := unscored_table(groups):
        text += "\n### Candidates without a score (nan, ranked last)\n\n" + unscored
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(comps, args.png)
        print(f"figure: {args.png}")
    return text


if __name__ == "__main__":
    main()
