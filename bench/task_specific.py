"""Task-specific reward models (the paper's transfer study, at laptop scale): one value RM per training
level, each trained on that level's MCTS trees only, then every RM guides the scripted policy on every
level (the other training levels and the held-out ones), next to the RM trained on all four.

Trees come from the pipeline's ``trees.jsonl`` (25 per level by default); every RM gets the same number
of optimiser steps.  Writes ``results.md`` (levels x RMs: Best-of-5 success minus greedy), ``results.json``
and ``task_specific.png`` under ``--out``.

    python -m agentrm.pipeline --config configs/pipeline/tiny.yaml     # the trees and the all-level RM (once)
    python bench/task_specific.py                                        # 24 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository (agentrm, and bench as a namespace package)

from agentrm.targets.mcts import read_trees  # noqa: E402
from bench.paper_common import HELD_IN, HELD_OUT, figure, fit_on_trees, spec  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", default="runs/pipeline_tiny/trees/trees.jsonl")
    ap.add_argument("--all_rm", default="runs/pipeline_tiny/rm/hf_model", help="the RM trained on all levels")
    ap.add_argument("--min_visits", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per RM")
    ap.add_argument("--episodes", type=int, default=16, help="evaluation episodes per level")
    ap.add_argument("--out", default="runs/paper/task_specific")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    by_level = defaultdict(list)
    for t in read_trees(args.trees):
        by_level[t.task].append(t)
    out = Path(args.out)
    info: dict[str, dict] = {}
    scorers = {}
    for level in HELD_IN:
        trees = by_level.get(level) or by_level.get(f"babyai/{level}")
        if not trees:
            raise SystemExit(f"{args.trees}: no trees of level {level} (tasks: {sorted(by_level)})")
        info[level] = fit_on_trees(trees, out / f"targets_{level}.jsonl", out / f"rm_{level}", args.min_visits, args.steps)
        scorers[f"only_{level}"] = str(out / f"rm_{level}" / "hf_model")
        print(level, info[level], flush=True)
    scorers["all_levels"] = args.all_rm

    from agentrm.search.evaluate import EvalConfig, evaluate
    from agentrm.search.specs import PolicySpec, ScorerSpec

    evaluate(EvalConfig(
        out_dir=str(out / "eval"),
        held_in=[spec(lv) for lv in HELD_IN],
        held_out=[spec(lv) for lv in HELD_OUT],
        episodes=args.episodes,
        seed=1000,
        train_seed=0,
        train_episodes=200,
        policy=PolicySpec(kind="expert", error_rate=0.6),
        scorers=[ScorerSpec(path=p, name=n, max_length=1024, batch_size=16) for n, p in scorers.items()],
        greedy=True,
        best_of_n=[5],
        beam=[],
        num_threads=1,
        progress=False,
        show=False,
    ))
    # per evaluation level: success of greedy and of Best-of-5 with each RM
    succ: dict[tuple[str, str], list[float]] = defaultdict(list)
    with open(out / "eval" / "episodes.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            level = r["env"].split(":", 1)[1].split("?", 1)[0]
            if r["method"] == "greedy":
                succ[(level, "greedy")].append(r["success"])
            elif r["method"] == "best_of_n":
                succ[(level, r["scorer"])].append(r["success"])
    rate = {k: sum(v) / len(v) for k, v in succ.items()}
    levels = HELD_IN + HELD_OUT
    names = list(scorers)
    lines = [
        f"Best-of-5 success minus greedy per evaluation level ({args.episodes} episodes each; scripted agent, error "
        f"rate 0.6); rows: the level the RM was trained on (diagonal = in-task); `python bench/task_specific.py`.",
        "",
        "| RM trained on \\ evaluated on | " + " | ".join(levels) + " | mean, other levels |",
        "|---|" + "---:|" * (len(levels) + 1),
        "| greedy success | " + " | ".join(f"{rate[(lv, 'greedy')]:.2f}" for lv in levels) + " | |",
    ]
    gains = {}
    for name in names:
        trained = name.removeprefix("only_")
        gains[name] = {lv: rate[(lv, name)] - rate[(lv, "greedy")] for lv in levels}
        others = [g for lv, g in gains[name].items() if lv != trained]
        cells = [(f"**{g:+.2f}**" if lv == trained else f"{g:+.2f}") for lv, g in gains[name].items()]
        lines.append(f"| {trained} | " + " | ".join(cells) + f" | {sum(others) / len(others):+.3f} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rms": info, "gain": gains, "success": {
        f"{k[0]}/{k[1]}": v for k, v in rate.items()}}, indent=2))

    with figure(out / "task_specific.png", (9, 3.2)) as (fig, ax):
        im = ax.imshow([[gains[n][lv] for lv in levels] for n in names], cmap="RdBu", vmin=-0.4, vmax=0.4)
        ax.set_xticks(range(len(levels)), levels, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for i, n in enumerate(names):
            for j, lv in enumerate(levels):
                ax.text(j, i, f"{gains[n][lv]:+.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, label="Best-of-5 - greedy")
        ax.set_title("task-specific value RMs")
    print(table)
    return info


if __name__ == "__main__":
    main()
