"""Evaluation harness: greedy, sampling, Best-of-N and beam search over held-in and held-out env specs.

Held-in and held-out sets are lists of env specs (``babyai:GoToLocal?max_steps=24``,
``sciworld:boil@test``, ``textworld:cooking@test``).  Episode seeds come from the data
collector's derivation (:meth:`agentrm.data.jobs.Job.seeds`: a pure function of ``(seed,
task, index)``) with a different base ``seed`` than the reward model's training data;
:func:`check_disjoint_instances` verifies through each environment's
:meth:`~agentrm.envs.base.Env.instance_key` that no evaluation episode plays a training
task instance (a seed for BabyAI, a variation for ScienceWorld, a game for TextWorld).
The acting policy of episode ``i`` is seeded the same way for every method, so greedy
and the first Best-of-N sample are the same trajectory.

Best-of-N draws ``max(best_of_n)`` samples per episode once; Best-of-n for smaller n uses
the first n of them (nested pools, the usual test-time scaling protocol), and each
Best-of-n is scored separately so its scorer work is counted exactly.  ``pass@N`` (any of
the first N samples succeeds) and ``sampling`` (mean success of the samples: the
expected success of one sample) come from the same pool without a scorer.

Outputs in ``out_dir``: ``episodes.jsonl`` (one row per episode and method),
``summary.csv``, ``summary.md``, ``scaling.png``, ``config.json`` and ``comparisons.csv``/``.md``:
every Best-of-N and beam method against greedy and against Best-of-1, as the mean per-episode
difference in success with a paired bootstrap 95% interval (:mod:`agentrm.search.compare`).

Serving scale and resumption (:mod:`agentrm.search.runner`): ``concurrency`` episodes run at
once on threads (each with its own environments; scorers shared under a lock; a served policy sees
the requests of all of them). Each finished episode is appended to ``episodes.jsonl`` at once, and
a rerun with the same configuration skips the episodes already there, so a killed evaluation
resumes where it stopped and ends with the summary of an uninterrupted run.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agentrm.cli_errors import building, run_cli
from agentrm.data.jobs import Job
from agentrm.envs.base import Env, close_quietly
from agentrm.envs.registry import EnvSpec, check_disjoint, make_env, parse_specs
from agentrm.scoring import Scorer
from agentrm.search.beam import beam_search
from agentrm.search.best_of_n import TieBreak, rank_samples
from agentrm.search.compare import comparisons_markdown, paired_comparisons, write_comparisons
from agentrm.search.episode import SearchResult
from agentrm.search.greedy import greedy as run_greedy
from agentrm.search.greedy import sample_trajectories
from agentrm.search.report import plot_scaling, print_table, summarize, to_markdown, write_csv
from agentrm.search.runner import EpisodeLog, SharedScorer, run_jobs
from agentrm.search.specs import (
    PolicySpec,
    ScorerSpec,
    build_scorer,
    check_policy_spec,
    check_scorer_spec,
    policy_factory,
)


def instance_keys(env: Env, spec: EnvSpec, episodes: int, seed: int) -> set[str]:
    """Task-instance keys of ``episodes`` jobs of ``spec`` with base ``seed``."""
    return {env.instance_key(Job(spec, i).seeds(seed)[0]) for i in range(episodes)}


def check_disjoint_instances(
    envs: dict[str, Env], specs: list[EnvSpec], episodes: int, seed: int, train_specs: list[EnvSpec],
    train_seed: int, train_episodes: int,
) -> None:
    """Raise ``ValueError`` if an evaluation episode plays a task instance of the training data.

    Args:
        envs: built environments by spec string (training specs not in it are built and closed here).
        specs: evaluation specs; ``episodes`` each with base ``seed``.
        train_specs: the specs the reward model's data came from; ``train_episodes`` each with ``train_seed``.
    """
    evaluation: set[str] = set()
    for spec in specs:
        evaluation |= instance_keys(envs[str(spec)], spec, episodes, seed)
    train: set[str] = set()
    for spec in train_specs:
        env = envs.get(str(spec)) or make_env(spec)
        try:
            train |= instance_keys(env, spec, train_episodes, train_seed)
        finally:
            if str(spec) not in envs:
                close_quietly(env)
    check_disjoint(train, evaluation)


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


def _reply_report(policies: list[Any]) -> dict[str, Any] | None:
    """Totals of the LM policies' :class:`~agentrm.policies.prompt.ReplyStats` (``None`` for scripted policies)."""
    stats = [p.reply_stats for p in policies if hasattr(p, "reply_stats")]
    if not stats:
        return None
    tot = {k: sum(getattr(s, k) for s in stats) for k in ("replies", "invalid", "unresolved")}
    tot["invalid_rate"] = tot["invalid"] / tot["replies"] if tot["replies"] else 0.0
    tot["invalid_examples"] = [e for s in stats for e in s.examples][:10]
    return tot


def _episode_rows(
    env: Env,
    spec: EnvSpec,
    env_set: str,
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
    env_seed, policy_seed, tie_seed = Job(spec, index).seeds(base_seed)
    eid = Job(spec, index).episode_id(base_seed)
    common = {"env": str(spec), "env_set": env_set, "episode": index, "seed": env_seed}
    task = spec.name
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
                    cached_tokens=int(res.stats.get("cached_tokens", 0)),
                    scoring_path="+".join(sorted(res.stats.get("scoring_paths", {}))) or None,
                    **common,
                )
            )
    return rows


def _same_config(stored: dict, current: dict, policy: PolicySpec, scorers: list[ScorerSpec]) -> bool:
    """Whether a run's stored ``config.json`` describes ``current``; a policy or scorer option added since
    the run was written counts as equal when it has its default value (a run of an older version resumes)."""
    stored = json.loads(json.dumps(stored))
    for spec, got in [(policy, stored.get("policy"))] + list(zip(scorers, stored.get("scorers") or [])):
        if isinstance(got, dict):
            defaults = asdict(type(spec)())
            for key, value in asdict(spec).items():
                if key not in got and value == defaults.get(key):
                    got[key] = value
    return stored == current


def evaluate(
    out_dir: str = "runs/search/eval",
    held_in: list[str] | None = None,
    held_out: list[str] | None = None,
    episodes: int = 20,
    seed: int = 1000,
    train_envs: list[str] | None = None,
    train_seed: int = 0,
    train_episodes: int = 1000,
    policy: PolicySpec | None = None,
    scorers: list[ScorerSpec] | None = None,
    greedy: bool = True,
    best_of_n: list[int] | None = None,
    beam: list[tuple[int, int]] | None = None,
    beam_max_depth: int = 100,
    beam_episodes: int | None = None,
    tie_break: TieBreak = "first",
    num_threads: int | None = None,
    concurrency: int = 1,
    resume: bool = True,
    progress: bool = True,
    show: bool = True,
) -> list[dict[str, Any]]:
    """Run the search methods on env specs and write per-episode rows, summary tables and a scaling plot.

    Args:
        out_dir: output directory.
        held_in: env specs of task types in the reward model's training data (evaluation
            instances: another split or other seeds).
        held_out: env specs of task types never seen in training.  At least one set is needed.
        episodes: episodes per spec.
        seed: base seed of the evaluation episodes.
        train_envs: the specs the training data was collected from (default: ``held_in`` with
            split ``train``), checked with ``train_seed`` and ``train_episodes`` for shared task instances.
        train_seed: base seed the training data was collected with (``python -m agentrm.collect --seed``).
        train_episodes: training episodes per spec checked for overlap.
        policy: the acting policy (default: each environment's expert with error rate 0.7).
        scorers: scorers for Best-of-N and beam search (default: the value RM at runs/tiny_value_rm/hf_model).
        greedy: run the greedy baseline.
        best_of_n: N values (the largest sets the sample pool; [] skips Best-of-N, pass@N and sampling).
        beam: (W, K) pairs for beam search ([] skips it).
        beam_max_depth: step budget of a beam.
        beam_episodes: run beam search on the first this-many episodes of each spec only (None:
            all); beam search is the costly method when clones replay (ScienceWorld).
        tie_break: Best-of-N ties: ``first``, ``random`` (seeded per episode) or ``shortest``.
        num_threads: torch CPU threads (None: torch's default).
        concurrency: episodes run at once (threads; each its own environments; the summary does not
            depend on it).
        resume: skip the episodes ``out_dir/episodes.jsonl`` already holds (a run with the same
            configuration that was interrupted); ``False`` starts the file anew.
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
    train_envs: list[str] | None,
    train_seed: int,
    train_episodes: int,
    policy: PolicySpec | None,
    scorers: list[ScorerSpec] | None,
    greedy: bool,
    best_of_n: list[int] | None,
    beam: list[tuple[int, int]] | None,
    beam_max_depth: int,
    beam_episodes: int | None,
    tie_break: TieBreak,
    concurrency: int,
    resume: bool,
    progress: bool,
    show: bool,
) -> list[dict[str, Any]]:
    """:func:`evaluate` without the thread setting."""
    sets = {"held_in": parse_specs(held_in), "held_out": parse_specs(held_out)}
    if not sets["held_in"] and not sets["held_out"]:
        raise ValueError("give held_in and/or held_out env specs (e.g. babyai:GoToLocal?max_steps=24)")
    train_specs = (
        parse_specs(train_envs) if train_envs is not None else [s.with_split("train") for s in sets["held_in"]]
    )
    policy = policy or PolicySpec()
    scorers = [ScorerSpec(path="runs/tiny_value_rm/hf_model")] if scorers is None else scorers
    best_of_n = [1, 2, 4, 8] if best_of_n is None else best_of_n
    beam = [(2, 4)] if beam is None else [tuple(b) for b in beam]
    names = [s.label for s in scorers]
    if len(set(names)) != len(names):
        raise ValueError(f"scorer labels must be unique, got {names}; set 'name'")
    with building():  # every model is checked (placement, reachable) before anything is built or loaded
        check_policy_spec(policy)
        for i, s in enumerate(scorers):
            check_scorer_spec(s, f"scorers[{i}]")
    envs: dict[str, Env] = {str(s): make_env(s) for specs in sets.values() for s in specs}
    check_disjoint_instances(
        envs, [s for specs in sets.values() for s in specs], episodes, seed, train_specs, train_seed, train_episodes
    )
    built = {}
    for i, s in enumerate(scorers):
        with building(f"scorers[{i}] ({s.label})"):
            built[s.label] = build_scorer(s, seed)
    with building(f"policy ({policy.kind})"):
        make_lm_policy = policy_factory(policy)
    made: list[Any] = []

    def make_policy(policy_seed: int, greedy_: bool):
        made.append(make_lm_policy(policy_seed, greedy_))
        return made[-1]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "held_in": [str(s) for s in sets["held_in"]],
        "held_out": [str(s) for s in sets["held_out"]],
        "episodes": episodes,
        "seed": seed,
        "train_envs": [str(s) for s in train_specs],
        "train_seed": train_seed,
        "policy": asdict(policy),
        "scorers": [asdict(s) for s in scorers],
        "greedy": greedy,
        "best_of_n": best_of_n,
        "beam": beam,
        "beam_max_depth": beam_max_depth,
        "beam_episodes": beam_episodes,
        "tie_break": tie_break,
    }
    cfg_path = out / "config.json"
    if resume and cfg_path.exists() and (out / "episodes.jsonl").exists():
        if not _same_config(json.loads(cfg_path.read_text()), json.loads(json.dumps(config)), policy, scorers):
            raise ValueError(
                f"{out} holds episodes of another configuration; pick another out_dir or pass --resume false"
            )
    cfg_path.write_text(json.dumps(config, indent=2))
    jobs = [(name, spec, i) for name, specs in sets.items() for spec in specs for i in range(episodes)]
    log = EpisodeLog(out / "episodes.jsonl", lambda r: (r["env_set"], r["env"], r["episode"]), resume=resume)
    todo = [j for j in jobs if not log.done((j[0], str(j[1]), j[2]))]
    main_thread, local, extra_envs, lock = threading.get_ident(), threading.local(), [], threading.Lock()
    scorer_lock = threading.Lock()

    def env_for(spec: EnvSpec) -> Env:
        if threading.get_ident() == main_thread:
            return envs[str(spec)]
        own = local.__dict__.setdefault("envs", {})
        if str(spec) not in own:
            own[str(spec)] = make_env(spec)
            with lock:
                extra_envs.append(own[str(spec)])
        return own[str(spec)]

    def run(job) -> list[dict[str, Any]]:
        name, spec, i = job
        shared = {k: SharedScorer(v, scorer_lock) for k, v in built.items()}
        beams = beam if beam_episodes is None or i < beam_episodes else []
        return _episode_rows(
            env_for(spec), spec, name, i, seed, make_policy, shared, greedy, best_of_n, beams, beam_max_depth, tie_break
        )

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="episodes", unit="ep", disable=not progress)
    try:
        run_jobs(todo, run, log, concurrency, on_done=lambda: bar.update(1))
    finally:
        bar.close()
        for env in [*envs.values(), *extra_envs]:
            close_quietly(env)
    order = {(name, str(spec), i): n for n, (name, spec, i) in enumerate(jobs)}
    rows = [r for key in sorted(log.rows, key=lambda k: order.get(k, len(order))) for r in log.rows[key]]
    replies = _reply_report(made)
    if replies is not None:  # LM policies: how many replies held no valid action (never silent)
        (out / "policy_replies.json").write_text(json.dumps(replies, indent=2))
        print(f"policy replies: {replies['replies']}, invalid: {replies['invalid']} "
              f"({replies['invalid_rate']:.1%}), still invalid after resampling: {replies['unresolved']} "
              f"(details: {out / 'policy_replies.json'})")
    summary = summarize(rows)
    write_csv(summary, out / "summary.csv")
    (out / "summary.md").write_text(to_markdown(summary))
    plot_scaling(summary, out / "scaling.png")
    comparisons = paired_comparisons(rows, seed=seed)
    write_comparisons(comparisons, out)
    if show:
        print_table(summary, title=f"search evaluation ({out})")
        if comparisons:
            print("paired differences in success (same episodes; 95% bootstrap CI):")
            print(comparisons_markdown(comparisons))
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry point: ``python -m agentrm.search --config configs/search/demo.yaml``."""
    from jsonargparse import auto_cli

    return auto_cli(evaluate, args=argv)


def cli(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m agentrm.search``: :func:`main`, with a config that cannot be built reported in one line (exit 2)."""
    return run_cli("agentrm.search", main, argv)
