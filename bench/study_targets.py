"""Value targets at an equal environment-step budget: Monte-Carlo vs MCTS (root-only) vs MCTS (commit).

For the same budget of environment steps (every ``env.step`` counted, rollouts and replays
included), with the same noisy scripted BabyAI policy on the four training levels:

* **mc**: the collector's episodes, every step valued by ``mc_rollouts`` rollouts, one sibling
  branch per episode (what ``python -m agentrm.collect`` writes), until the budget is spent;
* **mcts_root**: one tree per task instance, all ``simulations`` from the first state, flattened
  with :func:`agentrm.targets.mcts.flatten_tree` (``min_visits``), until the budget is spent;
* **mcts_commit**: the same, searching while acting (``simulations`` per committed step).

The tiny value RM (``configs/tiny/value_rm.yaml``: same backbone, seed and number of optimiser
steps) is trained on each, then all three guide the same policy on the same evaluation: Best-of-5
on 25 episodes per held-in level (other seeds) and per held-out level, outcome-blind, with the
paired difference to greedy and its bootstrap 95% interval.  Writes ``results.md``,
``results.json`` and ``targets.png`` under ``--out``.

    python bench/study_targets.py                       # 22 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository (agentrm, and bench as a namespace package)

from agentrm.data.jobs import Job  # noqa: E402
from agentrm.data.schema import Trajectory, write_jsonl  # noqa: E402
from agentrm.envs.babyai import BabyAITextEnv  # noqa: E402
from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy  # noqa: E402
from agentrm.envs.registry import EnvSpec  # noqa: E402
from agentrm.targets.mcts import MCTS, MCTSConfig, flatten_tree  # noqa: E402
from agentrm.targets.monte_carlo import run_episode  # noqa: E402
from bench.paper_common import HELD_IN as LEVELS  # noqa: E402
from bench.paper_common import HELD_OUT, best_of_n_eval, figure, spec, train_value_rm, versus_greedy  # noqa: E402

TARGETS = ("mc", "mcts_root", "mcts_commit")


class CountingEnv(BabyAITextEnv):
    """BabyAI env counting every ``step`` in a counter shared by all its clones."""

    def __init__(self, *a, counter: list[int], **kw):
        super().__init__(*a, **kw)
        self.counter = counter

    def step(self, action: str):
        self.counter[0] += 1
        return super().step(action)


def _jobs(levels: list[str]):
    i = 0
    while True:
        for lv in levels:
            yield Job(EnvSpec("babyai", lv), i)
        i += 1


def collect(kind: str, args: argparse.Namespace) -> tuple[list[Trajectory], dict]:
    """Records of one target type until ``args.budget`` env steps are spent."""
    counter = [0]
    envs = {lv: CountingEnv(lv, max_steps=args.max_steps, counter=counter) for lv in LEVELS}
    out: list[Trajectory] = []
    units = 0
    for job in _jobs(LEVELS):
        if counter[0] >= args.budget:
            break
        env_seed, pol_seed, other_seed = job.seeds(args.seed)
        policy = ScriptedBabyAIPolicy(args.error_rate, seed=pol_seed)
        task = f"babyai/{job.spec.task}"
        if kind == "mc":
            out += run_episode(
                envs[job.spec.task], policy, env_seed, episode_id=job.episode_id(args.seed), task=task,
                rollouts=args.mc_rollouts, siblings=1, branch_seed=other_seed,
            )
        else:
            commit = kind == "mcts_commit"
            sims = args.simulations_commit if commit else args.simulations
            m = MCTS(policy, MCTSConfig(sims, args.k, args.c, args.max_steps, commit=commit), seed=other_seed)
            tree = m.search(envs[job.spec.task], env_seed, tree_id=job.episode_id(args.seed), task=task)
            out += flatten_tree(tree, min_visits=args.min_visits)
        units += 1
    labelled = sum(s.value is not None for r in out for s in r.steps)
    return out, {"env_steps": counter[0], "episodes_or_trees": units, "records": len(out), "states": labelled}


def plot(comparisons: list[dict], path: Path) -> None:
    with figure(path, (6.5, 3.8)) as (fig, ax):
        sets = ["held_in", "held_out"]
        for i, kind in enumerate(TARGETS):
            rows = [versus_greedy(comparisons, kind, s) for s in sets]
            xs = [j + (i - 1) * 0.25 for j in range(len(sets))]
            ys = [r["difference"] for r in rows]
            err = [[y - r["ci_low"] for y, r in zip(ys, rows)], [r["ci_high"] - y for y, r in zip(ys, rows)]]
            ax.bar(xs, ys, width=0.25, yerr=err, capsize=4, label=kind)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_ylabel("Best-of-5 success - greedy (95% CI)")
        ax.set_title("value targets at an equal env-step budget")
        ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=110_000, help="env steps per target type")
    ap.add_argument("--error_rate", type=float, default=0.6)
    ap.add_argument("--max_steps", type=int, default=24)
    ap.add_argument("--mc_rollouts", type=int, default=4)
    ap.add_argument("--simulations", type=int, default=32, help="root-only MCTS: simulations per tree")
    ap.add_argument("--simulations_commit", type=int, default=16, help="commit MCTS: per committed step")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--c", type=float, default=1.0)
    ap.add_argument("--min_visits", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per RM")
    ap.add_argument("--episodes", type=int, default=25, help="evaluation episodes per level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/study_targets")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    for kind in TARGETS:
        t0 = time.perf_counter()
        data, stats = collect(kind, args)
        write_jsonl(out / f"{kind}.jsonl", data)
        stats["collect_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        stats.update(train_value_rm(out / f"{kind}.jsonl", out / f"rm_{kind}", args.steps))
        stats["fit_s"] = round(time.perf_counter() - t0, 1)
        info[kind] = stats
        print(kind, stats, flush=True)

    comparisons = best_of_n_eval(
        out / "eval",
        {k: str(out / f"rm_{k}" / "hf_model") for k in TARGETS},
        held_in=[spec(lv, args.max_steps) for lv in LEVELS],
        held_out=[spec(lv, args.max_steps) for lv in HELD_OUT],
        episodes=args.episodes,
        error_rate=args.error_rate,
    )
    lines = [
        f"Equal budget of {args.budget:,} env steps per target type; scripted agent, error rate {args.error_rate}; "
        f"tiny value RM, {args.steps} optimiser steps each; Best-of-5 vs greedy on {args.episodes} episodes per level "
        f"(`python bench/study_targets.py`).",
        "",
        "| targets | env steps | episodes / trees | labelled states | val/auroc | val/rank_acc | held-in BoN5 - greedy [95% CI] "
        "| held-out BoN5 - greedy [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for kind in TARGETS:
        s = info[kind]
        cells = []
        for env_set in ("held_in", "held_out"):
            c = versus_greedy(comparisons, kind, env_set)
            s[f"{env_set}_bon5"] = c["method_success"]
            s[f"{env_set}_greedy"] = c["baseline_success"]
            s[f"{env_set}_diff"] = [c["difference"], c["ci_low"], c["ci_high"]]
            cells.append(f"{c['method_success']:.3f} - {c['baseline_success']:.3f} = **{c['difference']:+.3f}** "
                         f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]")
        lines.append(
            f"| {kind} | {s['env_steps']:,} | {s['episodes_or_trees']} | {s['states']:,} | {s.get('val/auroc', float('nan')):.3f} "
            f"| {s.get('val/rank_acc', float('nan')):.3f} | {cells[0]} | {cells[1]} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), **info}, indent=2))
    plot(comparisons, out / "targets.png")
    print(table)
    return info


if __name__ == "__main__":
    main()
