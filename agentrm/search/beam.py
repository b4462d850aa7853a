"""Step-level beam search guided by a scorer, with the environment in the loop.

At every depth each of the (at most) ``width`` live beams is expanded with ``k`` actions
sampled from the policy (duplicates within a beam removed).  The candidates of one beam
are each executed on their own clone of the beam's environment first; then the candidates of
all beams are scored together (:func:`agentrm.scoring.score_many`: ``score_candidates(beam_history,
[Step(action, observation), ...])`` per beam, in shared forwards on the RM scorers' cached path;
the value RM reads each value at the end of the candidate's observation, as in training).  The ``width`` best non-terminal children over all expansions become the
next beams; children whose episode ended are kept as *finished* candidates with their score.

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

from collections.abc import Callable
from dataclasses import dataclass

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env
from agentrm.policies.base import Policy, propose_many
from agentrm.scoring import Scorer, path_calls, score_many
from agentrm.search.episode import SearchResult, begin_episode, extend, finish


def normalize_candidate(text: str) -> str:
    """Dedupe key of a candidate action: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


@dataclass
class _Node:
    env: Env
    history: Trajectory
    score: float
    done: bool = False
    reward: float = 0.0
    success: bool = False


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
    hide_terminal_observation: bool | None = None,
) -> SearchResult:
    """Run step-level beam search on episode ``seed`` (``env`` is reset here, then left as is).

    Args:
        width: ``W``, beams kept per depth.
        k: ``K``, actions sampled per beam per step.
        max_depth: step budget (actions per beam).
        dedupe: key for removing duplicate candidates within a beam (None keeps duplicates).
        hide_terminal_observation: outcome-blind scoring: a candidate that ends the episode is
            scored with an empty observation, because the environment's last reply may state the
            outcome ("Mission complete.", "You won!").  None follows the scorer's
            ``exclude_final_step`` (the same choice for Best-of-N and beam).

    Returns:
        A :class:`SearchResult` whose ``candidates``/``scores`` are the final live beams and the
        failed fallbacks; ``stats`` counts ``env_steps``, ``policy_calls``, ``candidates_scored``,
        ``tokens_scored`` (tokens forwarded), ``cached_tokens`` (prefix tokens read from the scorer's
        cache), ``forward_passes``, ``scoring_paths`` (scoring calls per path: cached/packed/plain),
        ``depth`` and ``stop`` (``finished``: the best-scored
        candidate had finished; ``all_done``; or ``budget``).
    """
    if width < 1 or k < 1:
        raise ValueError(f"need width >= 1 and k >= 1, got width={width}, k={k}")
    if hide_terminal_observation is None:
        hide_terminal_observation = bool(getattr(scorer, "exclude_final_step", False))
    before = scorer.counters.as_dict()
    root = _Node(env=env, history=begin_episode(env, seed, task, episode_id), score=float("nan"))
    beams, finished = [root], []
    stats = {"env_steps": 0, "policy_calls": 0, "candidates_scored": 0, "depth": 0, "stop": "budget"}
    for depth in range(max_depth):
        children: list[_Node] = []
        # all beams' proposals at once (concurrent requests for a served policy), in beam order
        proposals = propose_many(policy, [(b.env, b.history, k) for b in beams])
        stats["policy_calls"] += len(beams)
        stepped = [_step(beam, cands, dedupe, stats) for beam, cands in zip(beams, proposals)]
        # all beams' candidates scored together (one forward per depth on the RM scorers' cached path)
        scores = score_many(scorer, [(beam.history, _shown(s, hide_terminal_observation)) for beam, s in zip(beams, stepped)])
        for beam, s, sc in zip(beams, stepped, scores):
            stats["candidates_scored"] += len(s)
            children.extend(_children(beam, s, sc))
            if beam is not root:
                beam.env.close()
        stats["depth"] = depth + 1
        for c in children:
            if c.done:
                c.env.close()
                finished.append(c)
        live = sorted((c for c in children if not c.done), key=_key, reverse=True)  # stable: expansion order
        beams = live[:width]
        for dropped in live[width:]:
            dropped.env.close()
        if not beams:
            stats["stop"] = "all_done"
            break
        if finished and max(map(_key, finished)) >= _key(beams[0]):
            stats["stop"] = "finished"
            break
    after = scorer.counters.as_dict()
    stats["tokens_scored"] = after["forward_tokens"] - before["forward_tokens"]
    stats["forward_passes"] = after["forward_passes"] - before["forward_passes"]
    stats["cached_tokens"] = after.get("cached_tokens", 0) - before.get("cached_tokens", 0)
    stats["scoring_paths"] = path_calls(before, after)
    pool = finished + [b for b in beams if b is not root] or [root]
    chosen = max(range(len(pool)), key=lambda i: (_key(pool[i]), -i))
    for b in beams:
        if b is not root:
            b.env.close()
    trajs = [
        finish(p.history, p.reward if p.done else 0.0, p.success, depth=len(p.history.steps)) for p in pool
    ]
    return SearchResult(
        method="beam",
        trajectory=trajs[chosen],
        candidates=trajs,
        scores=[p.score for p in pool],
        chosen=chosen,
        stats=stats,
    )


def _step(beam: _Node, cands: list[str], dedupe: Callable[[str], str] | None, stats: dict) -> list[tuple]:
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
        stepped.append((cand, child_env, obs, reward, done, info))
    return stepped


def _shown(stepped: list[tuple], hide_terminal: bool) -> list[Step]:
    """The candidates as the scorer sees them: the value RM reads the value after the observation, as in
    training; an episode-ending reply is withheld when outcome-blind (it may state the outcome)."""
    return [Step(c, "" if hide_terminal and done else obs) for c, _, obs, _, done, _ in stepped]


def _children(beam: _Node, stepped: list[tuple], scores) -> list[_Node]:
    return [
        _Node(
            env=child_env,
            history=extend(beam.history, cand, obs),
            score=float(score),
            done=bool(done),
            reward=float(reward),
            success=bool(info.get("success", False)),
        )
        for (cand, child_env, obs, reward, done, info), score in zip(stepped, scores.tolist())
    ]


def _key(node: _Node) -> float:
    """Ranking key: the score, with ``nan`` lowest."""
    return float("-inf") if node.score != node.score else node.score
