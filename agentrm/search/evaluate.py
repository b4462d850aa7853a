"""Evaluation harness: greedy, sampling, Best-of-N and beam search over held-in and held-out BabyAI levels.

Episode seeds come from the data collector's derivation
(:meth:`agentrm.data.collect.Job.seeds`: a pure function of ``(seed, level, index)``)
with a different base ``seed`` than the reward model's training data (``train_seed``,
default 0); :func:`check_disjoint_seeds` verifies that no evaluation episode is a
training episode.  The acting policy of episode ``i`` is seeded the same way for every
method, so greedy and the first Best-of-N sample are the same trajectory.

Best-of-N draws ``max(best_of_n)`` samples per episode once; Best-of-n for smaller n uses
the first n of them (nested pools, the usual test-time scaling protocol), and each
Best-of-n is scored separately so its scorer work is counted exactly.  ``pass@N`` (any of
the first N samples succeeds) and ``sampling`` (mean success of the samples: the
expected success of one sample) come from the same pool without a scorer.

Outputs in ``out_dir``: ``episodes.jsonl`` (one row per episode and method),
``summary.csv``, ``summary.md``, ``scaling.png`` and ``config.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agentrm.data.collect import Job
from agentrm.envs.babyai import BabyAITextEnv, check_levels
from agentrm.scoring import Scorer
from agentrm.search.beam import beam_search
from agentrm.search.best_of_n import TieBreak, rank_samples
from agentrm.search.episode import SearchResult
from agentrm.search.greedy import greedy as run_greedy
from agentrm.search.greedy import sample_trajectories
from agentrm.search.report import plot_scaling, print_table, summarize, to_markdown, write_csv
from agentrm.search.specs import PolicySpec, ScorerSpec, build_scorer, policy_factory

HELD_IN = ["GoToRedBall", "GoToObj", "GoToLocal", "PickupLoc"]
HELD_OUT = ["GoToRedBallGrey", "GoToRedBlueBall", "GoToObjS6", "GoToLocalS6N3", "PickupDist"]


def check_disjoint_seeds(
    levels: list[str], episodes: int, seed: int, train_seed: int, train_episodes: int
) -> None:
    """Raise if an evaluation env seed equals a training env seed of the same level.

    Raises:
        ValueError: naming the level and episode.
    """
    if seed == train_seed:
        raise ValueError(f"seed={seed} equals train_seed: evaluation episodes would be training episodes")
    for level in levels:
        train = {Job(level, i).seeds(train_seed)[0] for i in range(train_episodes)}
        for i in range(episodes):
            if Job(level, i).seeds(seed)[0] in train:
                raise ValueError(f"{level} evaluation episode {i} has a training seed; choose another seed")


def _row(res: SearchResult, **fields: Any) -> dict[str, Any]:
    t = res.trajectory
    return {
        "success": float(t.success),
        "reward": float(t.reward),
        "steps": len(t.steps),
        "candidates_scored": int(res.stats.get("candidates_scored", 0)),
        "tokens_scored": int(res.stats.get("tokens_scored", 0)),
        "forward_passes": int(res.stats.get("forward_passes", 0)),
        "chosen": res.chosen,
        "actions": [s.action for s in t.steps],
        **fields,
    }


def _episode_rows(
    env: BabyAITextEnv,
    level: str,
    level_set: str,
    index: int,
    base_seed: int,
    make_policy,
    scorers: dict[str, Scorer],
    greedy: bool,
    best_of_n: list[int],
    beam: list[tuple[int, int]],
    beam_max_depth: int,
    tie_break: TieBreak,
) -> list[dict[str, Any]]:
    env_seed, policy_seed, tie_seed = Job(level, index).seeds(base_seed)
    eid = Job(level, index).episode_id(base_seed)
    common = {"level": level, "level_set": level_set, "episode": index, "seed": env_seed}
    task = f"babyai/{level}"
    rows = []
    base = {"scorer": None, "n": None, "w": None, "k": None}
    if greedy:
        t0 = time.perf_counter()
        res = run_greedy(env, make_policy(policy_seed, True), env_seed, task=task, episode_id=eid)
        rows.append(_row(res, **base, method="greedy", wall_s=time.perf_counter() - t0, **common))
    if best_of_n:
        samples = sample_trajectories(
            env, make_policy(policy_seed, False), max(best_of_n), env_seed, task=task, episode_id=eid
        )
        n_max = len(samples)
        rows.append(
            {
                **base,
                "method": "sampling",
                "n": n_max,
                **common,
                "success": sum(t.success for t in samples) / n_max,
                "reward": sum(t.reward for t in samples) / n_max,
                "wall_s": sum(t.meta["wall_s"] for t in samples) / n_max,
            }
        )
        for n in sorted(set(best_of_n)):
            pool = samples[:n]
            sample_s = sum(t.meta["wall_s"] for t in pool)
            best = max(range(n), key=lambda i: (pool[i].reward, -i))
            rows.append(
                {
                    **base,
                    "method": "pass@N",
                    "scorer": "oracle-any",
                    "n": n,
                    **common,
                    "success": float(any(t.success for t in pool)),
                    "reward": pool[best].reward,
                    "wall_s": sample_s,
                }
            )
            for name, scorer in scorers.items():
                res = rank_samples(pool, scorer, tie_break, tie_seed)
                rows.append(
                    _row(
                        res,
                        **{**base, "scorer": name, "n": n},
                        method="best_of_n",
                        wall_s=sample_s + res.stats["score_wall_s"],
                        scores=[round(s, 4) for s in res.scores],
                        **common,
                    )
                )
    for w, k in beam:
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            res = beam_search(
                env,
                make_policy(policy_seed, False),
                scorer,
                w,
                k,
                env_seed,
                task=task,
                episode_id=eid,
                max_depth=beam_max_depth,
            )
            rows.append(
                _row(
                    res,
                    **{**base, "scorer": name, "w": w, "k": k},
                    method="beam",
                    wall_s=time.perf_counter() - t0,
                    stop=res.stats["stop"],
                    **common,
                )
            )
    return rows


def evaluate(
    out_dir: str = "runs/search/eval",
    held_in: list[str] | None = None,
    held_out: list[str] | None = None,
    episodes: int = 20,
    seed: int = 1000,
    train_seed: int = 0,
    train_episodes: int = 1000,
    max_steps: int | None = 24,
    policy: PolicySpec | None = None,
    scorers: list[ScorerSpec] | None = None,
    greedy: bool = True,
    best_of_n: list[int] | None = None,
    beam: list[tuple[int, int]] | None = None,
    beam_max_depth: int = 100,
    tie_break: TieBreak = "first",
    num_threads: int | None = None,
    progress: bool = True,
    show: bool = True,
) -> list[dict[str, Any]]:
    """Run the search methods on BabyAI levels and write per-episode rows, summary tables and a scaling plot.

    Args:
        out_dir: output directory.
        held_in: levels in the reward model's training data (default: GoToRedBall, GoToObj, GoToLocal, PickupLoc).
        held_out: levels never seen in training (default: GoToRedBallGrey, GoToRedBlueBall, GoToObjS6,
            GoToLocalS6N3, PickupDist). An empty list skips a set.
        episodes: episodes per level.
        seed: base seed of the evaluation episodes (must differ from ``train_seed``).
        train_seed: base seed the training data was collected with (``python -m agentrm.collect --seed``).
        train_episodes: training episodes per level checked for seed overlap.
        max_steps: environment step limit (the training data used 24).
        policy: the acting policy (default: scripted expert with error rate 0.7).
        scorers: scorers for Best-of-N and beam search (default: the value RM at runs/tiny_value_rm/hf_model).
        greedy: run the greedy baseline.
        best_of_n: N values (the largest sets the sample pool; [] skips Best-of-N, pass@N and sampling).
        beam: (W, K) pairs for beam search ([] skips it).
        beam_max_depth: step budget of a beam.
        tie_break: Best-of-N ties: ``first``, ``random`` (seeded per episode) or ``shortest``.
        num_threads: torch CPU threads (None: torch's default).
        progress: show a tqdm progress bar.
        show: print the summary table with rich.

    Returns:
        The summary rows (also in ``summary.csv``).
    """
    import torch

    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _evaluate(
            **{k: v for k, v in locals().items() if k not in ("torch", "threads", "num_threads")}
        )
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    out_dir: str,
    held_in: list[str] | None,
    held_out: list[str] | None,
    episodes: int,
    seed: int,
    train_seed: int,
    train_episodes: int,
    max_steps: int | None,
    policy: PolicySpec | None,
    scorers: list[ScorerSpec] | None,
    greedy: bool,
    best_of_n: list[int] | None,
    beam: list[tuple[int, int]] | None,
    beam_max_depth: int,
    tie_break: TieBreak,
    progress: bool,
    show: bool,
) -> list[dict[str, Any]]:
    """:func:`evaluate` without the thread setting."""
    held_in = HELD_IN if held_in is None else held_in
    held_out = HELD_OUT if held_out is None else held_out
    policy = policy or PolicySpec()
    scorers = [ScorerSpec(path="runs/tiny_value_rm/hf_model")] if scorers is None else scorers
    best_of_n = [1, 2, 4, 8] if best_of_n is None else best_of_n
    beam = [(2, 4)] if beam is None else [tuple(b) for b in beam]
    check_levels(held_in + held_out)
    check_disjoint_seeds(held_in, episodes, seed, train_seed, train_episodes)
    names = [s.label for s in scorers]
    if len(set(names)) != len(names):
        raise ValueError(f"scorer labels must be unique, got {names}; set 'name'")
    built = {s.label: build_scorer(s, max_steps, seed) for s in scorers}
    make_policy = policy_factory(policy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "held_in": held_in,
        "held_out": held_out,
        "episodes": episodes,
        "seed": seed,
        "train_seed": train_seed,
        "max_steps": max_steps,
        "policy": asdict(policy),
        "scorers": [asdict(s) for s in scorers],
        "greedy": greedy,
        "best_of_n": best_of_n,
        "beam": beam,
        "beam_max_depth": beam_max_depth,
        "tie_break": tie_break,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    jobs = [
        (ls, lv, i)
        for ls, lvs in (("held_in", held_in), ("held_out", held_out))
        for lv in lvs
        for i in range(episodes)
    ]
    envs: dict[str, BabyAITextEnv] = {}
    rows: list[dict[str, Any]] = []
    with open(out / "episodes.jsonl", "w", encoding="utf-8") as f:
        for ls, lv, i in tqdm(jobs, desc="episodes", unit="ep", disable=not progress):
            if lv not in envs:
                envs[lv] = BabyAITextEnv(lv, max_steps=max_steps)
            new = _episode_rows(
                envs[lv],
                lv,
                ls,
                i,
                seed,
                make_policy,
                built,
                greedy,
                best_of_n,
                beam,
                beam_max_depth,
                tie_break,
            )
            for r in new:
                f.write(json.dumps(r) + "\n")
            f.flush()
            rows.extend(new)
    summary = summarize(rows)
    write_csv(summary, out / "summary.csv")
    (out / "summary.md").write_text(to_markdown(summary))
    plot_scaling(summary, out / "scaling.png")
    if show:
        print_table(summary, title=f"search evaluation ({out})")
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry point: ``python -m agentrm.search --config configs/search/demo.yaml``."""
    from jsonargparse import auto_cli

    return auto_cli(evaluate, args=argv)
