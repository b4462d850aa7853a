"""Best-of-N: sample N whole trajectories with the environment in the loop, return the one the scorer likes best."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Literal

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env
from agentrm.policies.base import Policy
from agentrm.scoring import Scorer
from agentrm.search.blind import score_finished
from agentrm.search.episode import SearchResult
from agentrm.search.greedy import sample_trajectories

TieBreak = Literal["first", "random", "shortest"]


def select_best(
    scores: Sequence[float],
    trajectories: Sequence[Trajectory] | None = None,
    tie_break: TieBreak = "first",
    rng: random.Random | None = None,
    tol: float = 1e-9,
) -> int:
    """Index of the highest score; ``nan`` counts as the lowest possible.

    Scores within ``tol`` of the maximum tie and are broken by ``tie_break``: ``first``
    (lowest index), ``random`` (uniform with ``rng``), ``shortest`` (fewest steps, then lowest
    index; needs ``trajectories``).
    """
    if not scores:
        raise ValueError("no scores to select from")
    vals = [-math.inf if math.isnan(s) else float(s) for s in scores]
    best = max(vals)
    tied = [i for i, v in enumerate(vals) if v >= best - tol] if best > -math.inf else list(range(len(vals)))
    if tie_break == "first" or len(tied) == 1:
        return tied[0]
    if tie_break == "random":
        return (rng or random.Random(0)).choice(tied)
    if tie_break == "shortest":
        if trajectories is None:
            raise ValueError("tie_break='shortest' needs the trajectories")
        return min(tied, key=lambda i: (len(trajectories[i].steps), i))
    raise ValueError(f"tie_break must be 'first', 'random' or 'shortest', got {tie_break!r}")


def rank_samples(
    samples: Sequence[Trajectory],
    scorer: Scorer,
    tie_break: TieBreak = "first",
    tie_seed: int = 0,
) -> SearchResult:
    """Score already sampled trajectories with one ``score_trajectories`` call; pick the best.

    The samples are finished trajectories; an outcome-blind scorer gets each one's last step with its reply
    withheld (:func:`agentrm.search.blind.score_finished`).  Trajectory aggregation of step scores is the
    scorer's (e.g. ``ValueRMScorer(aggregate=...)``).
    ``stats`` reports the scorer's counter deltas (``candidates_scored`` = trajectories scored,
    ``tokens_scored``, ``forward_passes``), ``unscored`` (samples whose score is ``nan``, e.g. a judge reply
    without a rating: ranked last) and ``score_wall_s``.
    """
    before = scorer.counters.as_dict()
    t0 = time.perf_counter()
    scores = [float(s) for s in score_finished(scorer, samples)]
    wall = time.perf_counter() - t0
    after = scorer.counters.as_dict()
    chosen = select_best(scores, samples, tie_break, random.Random(tie_seed))
    steps = sum(len(t.steps) for t in samples)
    return SearchResult(
        method="best_of_n",
        trajectory=samples[chosen],
        candidates=list(samples),
        scores=scores,
        chosen=chosen,
        stats={
            "n": len(samples),
            "env_steps": steps,
            "policy_calls": steps,
            "candidates_scored": len(samples),
            "unscored": sum(math.isnan(s) for s in scores),
            "tokens_scored": after["forward_tokens"] - before["forward_tokens"],
            "forward_passes": after["forward_passes"] - before["forward_passes"],
            "score_wall_s": wall,
            "server_wait_s": (after.get("server_wait_ms", 0) - before.get("server_wait_ms", 0)) / 1000,
            "pass": any(t.success for t in samples),
        },
    )


def best_of_n(
    env: Env,
    policy: Policy,
    scorer: Scorer,
    n: int,
    seed: int,
    *,
    task: str = "",
    episode_id: str = "",
    tie_break: TieBreak = "first",
    tie_seed: int = 0,
) -> SearchResult:
    """Sample ``n`` trajectories of episode ``seed`` (each on a clone of the reset env) and return the best.

    The scorer sees only the text of each trajectory; ``result.stats["pass"]`` says whether
    any sample succeeded (the oracle pass@N).
    """
    samples = sample_trajectories(env, policy, n, seed, task=task, episode_id=episode_id)
    return rank_samples(samples, scorer, tie_break, tie_seed)
