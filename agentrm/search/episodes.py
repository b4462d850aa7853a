"""One evaluation episode: every configured method plays it, each from the same seeds, into result rows.

The acting policy of episode ``i`` is seeded the same way for every method (:meth:`agentrm.data.jobs.Job.seeds`),
so greedy and the first Best-of-N sample are the same trajectory. Best-of-N draws ``max(best_of_n)`` samples
once; Best-of-n for smaller n uses the first n of them (nested pools, the usual test-time scaling protocol),
and each Best-of-n is scored separately so its scorer work is counted exactly. ``pass@N`` (any of the first
N samples succeeds) and ``sampling`` (mean success of the samples: the expected success of one sample) come
from the same pool without a scorer; they are labelled as oracle / baseline rows, not search results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentrm.data.jobs import Job
from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env
from agentrm.envs.registry import EnvSpec
from agentrm.policies.base import Policy
from agentrm.scoring import Scorer
from agentrm.search.beam import beam_search
from agentrm.search.best_of_n import TieBreak, rank_samples
from agentrm.search.episode import SearchResult
from agentrm.search.greedy import greedy as run_greedy
from agentrm.search.greedy import sample_trajectories

MakePolicy = Callable[[int, bool], Policy]
"""``make(seed, greedy) -> Policy``."""


@dataclass(frozen=True)
class EpisodeJob:
    """One evaluation episode: episode ``index`` of ``spec`` in the set ``env_set`` (``held_in``/``held_out``)."""

    env_set: str
    spec: EnvSpec
    index: int

    @property
    def key(self) -> tuple[str, str, int]:
        """The key of its rows in ``episodes.jsonl``."""
        return (self.env_set, str(self.spec), self.index)


@dataclass(frozen=True)
class Methods:
    """Which methods play each episode (the fields of :class:`~agentrm.search.evaluate.EvalConfig` of that name)."""

    greedy: bool = True
    best_of_n: list[int] = field(default_factory=list)
    beam: list[tuple[int, int]] = field(default_factory=list)
    beam_max_depth: int = 100
    beam_episodes: int | None = None
    tie_break: TieBreak = "first"


@dataclass
class Episode:
    """The context every method of one episode shares."""

    env: Env
    job: EpisodeJob
    base_seed: int
    make_policy: MakePolicy
    scorers: dict[str, Scorer]

    def __post_init__(self) -> None:
        job = Job(self.job.spec, self.job.index)
        self.env_seed, self.policy_seed, self.tie_seed = job.seeds(self.base_seed)
        self.episode_id = job.episode_id(self.base_seed)
        self.common = {"env": str(self.job.spec), "env_set": self.job.env_set, "episode": self.job.index,
                       "seed": self.env_seed}

    @property
    def task(self) -> str:
        return self.job.spec.name

    def row(self, method: str, fields: dict[str, Any], res: SearchResult | None = None) -> dict[str, Any]:
        """A result row: the episode's keys, ``scorer``/``n``/``w``/``k`` (``None`` when unused), the result."""
        base = {"scorer": None, "n": None, "w": None, "k": None}
        return {**base, "method": method, **(_result(res) if res is not None else {}), **fields, **self.common}


def episode_rows(ep: Episode, methods: Methods) -> list[dict[str, Any]]:
    """Every configured method's rows for one episode."""
    rows = [greedy_row(ep)] if methods.greedy else []
    if methods.best_of_n:
        rows += best_of_n_rows(ep, methods.best_of_n, methods.tie_break)
    if methods.beam_episodes is None or ep.job.index < methods.beam_episodes:
        rows += beam_rows(ep, methods.beam, methods.beam_max_depth)
    return rows


def greedy_row(ep: Episode) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run_greedy(ep.env, ep.make_policy(ep.policy_seed, True), ep.env_seed, task=ep.task, episode_id=ep.episode_id)
    return ep.row("greedy", {"wall_s": time.perf_counter() - t0}, res)


def best_of_n_rows(ep: Episode, ns: list[int], tie_break: TieBreak) -> list[dict[str, Any]]:
    """``sampling`` (mean over the pool), then per N: ``pass@N`` (oracle) and Best-of-N per scorer."""
    samples = sample_trajectories(ep.env, ep.make_policy(ep.policy_seed, False), max(ns), ep.env_seed,
                                  task=ep.task, episode_id=ep.episode_id)
    rows = [ep.row("sampling", {"n": len(samples), **_mean_outcome(samples),
                                "wall_s": sum(t.meta["wall_s"] for t in samples) / len(samples)})]
    for n in sorted(set(ns)):
        pool = samples[:n]
        sample_s = sum(t.meta["wall_s"] for t in pool)
        best = max(range(n), key=lambda i: (pool[i].reward, -i))
        rows.append(ep.row("pass@N", {"scorer": "oracle-any", "n": n, "success": float(any(t.success for t in pool)),
                                      "reward": pool[best].reward, "wall_s": sample_s}))
        for name, scorer in ep.scorers.items():
            res = rank_samples(pool, scorer, tie_break, ep.tie_seed)
            rows.append(ep.row("best_of_n", {"scorer": name, "n": n, "wall_s": sample_s + res.stats["score_wall_s"],
                                             "scores": [round(s, 4) for s in res.scores]}, res))
    return rows


def beam_rows(ep: Episode, beam: list[tuple[int, int]], max_depth: int) -> list[dict[str, Any]]:
    rows = []
    for w, k in beam:
        for name, scorer in ep.scorers.items():
            t0 = time.perf_counter()
            res = beam_search(ep.env, ep.make_policy(ep.policy_seed, False), scorer, w, k, ep.env_seed,
                              task=ep.task, episode_id=ep.episode_id, max_depth=max_depth)
            rows.append(ep.row("beam", {
                "scorer": name, "w": w, "k": k, "wall_s": time.perf_counter() - t0, "stop": res.stats["stop"],
                "cached_tokens": int(res.stats.get("cached_tokens", 0)),
                "cache_evictions": int(res.stats.get("cache_evictions", 0)),
                "cache_oversized": int(res.stats.get("cache_oversized", 0)),
                "scoring_path": "+".join(sorted(res.stats.get("scoring_paths", {}))) or None,
            }, res))
    return rows


def _result(res: SearchResult) -> dict[str, Any]:
    t = res.trajectory
    return {
        "success": float(t.success),
        "reward": float(t.reward),
        "steps": len(t.steps),
        "candidates_scored": int(res.stats.get("candidates_scored", 0)),
        "unscored": int(res.stats.get("unscored", 0)),
        "tokens_scored": int(res.stats.get("tokens_scored", 0)),
        "forward_passes": int(res.stats.get("forward_passes", 0)),
        "server_wait_s": round(float(res.stats.get("server_wait_s", 0.0)), 4),
        "chosen": res.chosen,
        "actions": [s.action for s in t.steps],
    }


def _mean_outcome(samples: list[Trajectory]) -> dict[str, float]:
    n = len(samples)
    return {"success": sum(t.success for t in samples) / n, "reward": sum(t.reward for t in samples) / n}
