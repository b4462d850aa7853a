"""Data scaling (the paper's log-linear study, at laptop scale): the value RM trained on nested subsets of
the pipeline's MCTS trees, ``--sizes`` trees spanning 16x, and Best-of-5 success against data size.

Subsets are nested prefixes of the tree file (its order is round-robin over the four training levels,
so every subset covers them evenly), flattened with the pipeline's ``min_visits`` filter.  Each RM gets
the same number of optimiser steps (``--steps``; the small subsets are seen for more epochs).  All RMs
guide the same scripted policy on the same episodes.  Writes ``results.md``, ``results.json`` and
``data_scaling.png`` under ``--out``.

    python -m agentrm.pipeline --config configs/pipeline/tiny.yaml     # the trees (once)
    python bench/data_scaling.py                                         # 24 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository (agentrm, and bench as a namespace package)

from agentrm.targets.mcts import read_trees  # noqa: E402
from bench.paper_common import (  # noqa: E402
    HELD_IN,
    HELD_OUT,
    best_of_n_eval,
    cell,
    figure,
    fit_on_trees,
    spec,
    versus_greedy,
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", default="runs/pipeline_tiny/trees/trees.jsonl")
    ap.add_argument("--sizes", type=int, nargs="+", default=[6, 12, 25, 50, 100])
    ap.add_argument("--min_visits", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps per RM")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per level")
    ap.add_argument("--out", default="runs/paper/data_scaling")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    trees = read_trees(args.trees)
    if max(args.sizes) > len(trees):
        raise SystemExit(f"{args.trees}: {len(trees)} trees, fewer than --sizes {max(args.sizes)}")
    out = Path(args.out)
    info: dict[str, dict] = {}
    for size in sorted(args.sizes):
        info[str(size)] = fit_on_trees(trees[:size], out / f"targets_{size}.jsonl", out / f"rm_{size}",
                                       args.min_visits, args.steps)
        print(size, info[str(size)], flush=True)
    comparisons = best_of_n_eval(
        out / "eval",
        {f"trees{size}": str(out / f"rm_{size}" / "hf_model") for size in sorted(args.sizes)},
        held_in=[spec(lv) for lv in HELD_IN],
        held_out=[spec(lv) for lv in HELD_OUT],
        episodes=args.episodes,
    )
    lines = [
        f"Value RM on nested subsets of `{args.trees}` ({args.steps} optimiser steps each); Best-of-5 of the "
        f"scripted agent (error rate 0.6), {args.episodes} episodes per level; success (difference to greedy "
        f"[95% CI]); `python bench/data_scaling.py`.",
        "",
        "| trees | labelled states | val/auroc | held-in Best-of-5 | held-out Best-of-5 |",
        "|---:|---:|---:|---|---|",
    ]
    for size in sorted(args.sizes):
        s = info[str(size)]
        row = [versus_greedy(comparisons, f"trees{size}", e) for e in ("held_in", "held_out")]
        s["held_in"], s["held_out"] = row[0]["method_success"], row[1]["method_success"]
        s["greedy"] = {"held_in": row[0]["baseline_success"], "held_out": row[1]["baseline_success"]}
        lines.append(f"| {size} | {s['states']:,} | {s.get('val/auroc', float('nan')):.3f} | {cell(row[0])} | {cell(row[1])} |")
    g = info[str(max(args.sizes))]["greedy"]
    lines.append(f"| greedy (no RM) | | | {g['held_in']:.3f} | {g['held_out']:.3f} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), **info}, indent=2))

    with figure(out / "data_scaling.png", (6, 3.8)) as (fig, ax):
        xs = [info[str(s)]["states"] for s in sorted(args.sizes)]
        for env_set, style in (("held_in", "o-"), ("held_out", "s-")):
            ax.plot(xs, [info[str(s)][env_set] for s in sorted(args.sizes)], style, label=f"Best-of-5, {env_set}")
            ax.axhline(g[env_set], linestyle=":", color="C0" if env_set == "held_in" else "C1", label=f"greedy, {env_set}")
        ax.set_xscale("log")
        ax.set_xlabel("labelled states in the RM's training data")
        ax.set_ylabel("success rate")
        ax.set_title("data scaling of the value RM")
        ax.legend(fontsize=7)
    print(table)
    return info


if __name__ == "__main__":
    main()
