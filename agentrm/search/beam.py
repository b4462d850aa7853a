"""Step-level beam search guided by a scorer, with the environment in the loop.

At every depth each of the (at most) ``width`` live beams is expanded with ``k`` actions
sampled from the policy (duplicates within a beam removed).  The candidates of one beam
are each executed on their own clone of the beam's environment first; then the candidates of
all beams are scored together (:func:`agentrm.search.blind.score_children`: ``score_candidates(beam_history,
[Step(action, observation), ...])`` per beam, in shared forwards on the RM scorers' cached path; the value
RM reads each value at the end of the candidate's observation, as in training; an outcome-blind scorer
gets an episode-ending candidate with its reply withheld).  The ``width`` best non-terminal children over
all expansions become the next beams; children whose episode ended are kept as *finished* candidates with
their score.

**Selection reads the scorer only.**  The environment's reward and success flag are
recorded for the metrics but never consulted: the search stops when the best-scored
finished candidate scores at least as high as every live beam (it would be chosen over
them), when no live beam is left, or after ``max_depth`` steps, and it returns the
best-scored candidate among the finished ones and the live beams (ties: expansion order).

Environments must be clonable (``Env.clone``: a copy or a replay, see each family);
every clone is closed as soon as its node is dropped.

Ranking uses the candidate's score as is: for a value RM that is the value of the state
after the step; for the implicit PRM scorer it is by default ``Q_t``, the sum of the step
rewards of the prefix and the candidate (a candidate's own step reward is not comparable
across beams with different prefixes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env
from agentrm.policies.base import Policy, propose_many
from agentrm.scoring import Scorer, path_calls
from agentrm.search.blind import score_children
from agentrm.search.episode import SearchResult, begin_episode, extend, finish


def normalize_candidate(text: str) -> str:
    """Dedupe key of a candidate action: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


@dataclass
class Stepped:
    """A candidate action executed on its own clone of its beam's environment."""

    action: str
    env: Env
    observation: str
    reward: float
    done: bool
    info: dict[str, Any]

    @property
    def step(self) -> Step:
        return Step(self.action, self.observation)


@dataclass
class Node:
    """A beam or a child: the environment in its state, the history that led there and its score."""

    env: Env
    history: Trajectory
    score: float
    done: bool = False
    reward: float = 0.0
    success: bool = False

    @classmethod
    def child(cls, beam: Node, s: Stepped, score: float) -> Node:
        return cls(env=s.env, history=extend(beam.history, s.action, s.observation), score=float(score),
                   done=bool(s.done), reward=float(s.reward), success=bool(s.info.get("success", False)))

    @property
    def key(self) -> float:
        """Ranking key: the score, with ``nan`` lowest."""
        return float("-inf") if self.score != self.score else self.score


def beam_search(
    env: Env,
    policy: Policy,
    scorer: Scorer,
    width: int,
    k: int,
    seed: int,
    *,
    task: str = "",
    episode_id: str = "",
    max_depth: int = 100,
    dedupe: Callable[[str], str] | None = normalize_candidate,
) -> SearchResult:
    """Run step-level beam search on episode ``seed`` (``env`` is reset here, then left as is).

    Candidates are scored through :func:`agentrm.search.blind.score_children`: a scorer whose
    ``outcome_blind`` is set never sees what an episode-ending candidate returned (it reads it as the
    value RM / PRM / judge document for a withheld step, the same way Best-of-N does).

    Args:
        width: ``W``, beams kept per depth.
        k: ``K``, actions sampled per beam per step.
        max_depth: step budget (actions per beam).
        dedupe: key for removing duplicate candidates within a beam (None keeps duplicates).

    Returns:
        A :class:`SearchResult` whose ``candidates``/``scores`` are the final live beams and the
        failed fallbacks; ``stats`` counts ``env_steps``, ``policy_calls``, ``candidates_scored``, ``unscored``
        (candidates whose score is ``nan``, e.g. a judge reply without a rating: ranked last),
        ``tokens_scored`` (tokens forwarded), ``cached_tokens`` (prefix tokens read from the scorer's
        cache), ``forward_passes``, ``scoring_paths`` (scoring calls per path: cached/packed/plain),
        ``depth`` and ``stop`` (``finished``: the best-scored
        candidate had finished; ``all_done``; or ``budget``).
    """
    if width < 1 or k < 1:
        raise ValueError(f"need width >= 1 and k >= 1, got width={width}, k={k}")
    if max_depth < 1:
        raise ValueError(f"need max_depth >= 1, got {max_depth}")
    before = scorer.counters.as_dict()
    root = Node(env=env, history=begin_episode(env, seed, task, episode_id), score=float("nan"))
    beams, finished = [root], []
    stats = {"env_steps": 0, "policy_calls": 0, "candidates_scored": 0, "unscored": 0, "depth": 0, "stop": "budget"}
    for depth in range(max_depth):
        children = _expand(beams, root, policy, scorer, k, dedupe, stats)
        stats["depth"] = depth + 1
        for c in children:
            if c.done:
                c.env.close()
                finished.append(c)
        live = sorted((c for c in children if not c.done), key=lambda n: n.key, reverse=True)  # stable: expansion order
        beams = live[:width]
        for dropped in live[width:]:
            dropped.env.close()
        if not beams:
            stats["stop"] = "all_done"
            break
        if finished and max(n.key for n in finished) >= beams[0].key:
            stats["stop"] = "finished"
            break
    _work_stats(stats, before, scorer.counters.as_dict())
    pool = finished + [b for b in beams if b is not root] or [root]
    chosen = max(range(len(pool)), key=lambda i: (pool[i].key, -i))
    for b in beams:
        if b is not root:
            b.env.close()
    trajs = [
        finish(p.history, p.reward if p.done else 0.0, p.success, ended=p.done, depth=len(p.history.steps))
        for p in pool
    ]
    return SearchResult(method="beam", trajectory=trajs[chosen], candidates=trajs, scores=[p.score for p in pool],
                        chosen=chosen, stats=stats)


def _expand(beams: list[Node], root: Node, policy: Policy, scorer: Scorer, k: int,
            dedupe: Callable[[str], str] | None, stats: dict) -> list[Node]:
    """One depth: every beam's ``k`` proposals stepped on clones and scored together; the beams' envs closed."""
    # all beams' proposals at once (concurrent requests for a served policy), in beam order
    proposals = propose_many(policy, [(b.env, b.history, k) for b in beams])
    stats["policy_calls"] += len(beams)
    stepped = [_step(beam, cands, dedupe, stats) for beam, cands in zip(beams, proposals)]
    # all beams' candidates scored together (one forward per depth on the RM scorers' cached path)
    scores = score_children(scorer, [(b.history, [(c.step, c.done) for c in s]) for b, s in zip(beams, stepped)])
    children: list[Node] = []
    for beam, s, sc in zip(beams, stepped, scores):
        values = sc.tolist()
        stats["candidates_scored"] += len(s)
        stats["unscored"] += sum(math.isnan(v) for v in values)
        children.extend(Node.child(beam, c, score) for c, score in zip(s, values))
        if beam is not root:
            beam.env.close()
    return children


def _work_stats(stats: dict, before: dict, after: dict) -> None:
    """The scorer's work during the search: tokens forwarded, forward passes, cached tokens, paths."""
    stats["tokens_scored"] = after["forward_tokens"] - before["forward_tokens"]
    stats["forward_passes"] = after["forward_passes"] - before["forward_passes"]
    stats["cached_tokens"] = after.get("cached_tokens", 0) - before.get("cached_tokens", 0)
    for key in ("cache_evictions", "cache_oversized"):  # prefix-cache entries dropped to keep its byte budget
        stats[key] = after.get(key, 0) - before.get(key, 0)
    stats["scoring_paths"] = path_calls(before, after)
    stats["server_wait_s"] = (after.get("server_wait_ms", 0) - before.get("server_wait_ms", 0)) / 1000


def _step(beam: Node, cands: list[str], dedupe: Callable[[str], str] | None, stats: dict) -> list[Stepped]:
    """Execute each of ``beam``'s proposed actions (deduplicated) on its own clone of the beam's environment."""
    if dedupe is not None:
        seen: dict[str, str] = {}
        for c in cands:
            seen.setdefault(dedupe(c), c)
        cands = list(seen.values())
    stepped = []
    for cand in cands:
        child_env = beam.env.clone()
        obs, reward, done, info = child_env.step(cand)
        stats["env_steps"] += 1
        stepped.append(Stepped(cand, child_env, obs, float(reward), bool(done), dict(info)))
    return stepped
