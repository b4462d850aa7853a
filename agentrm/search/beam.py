"""Step-level beam search guided by a scorer, with the environment in the loop.

At every depth each of the (at most) ``width`` live beams is expanded with ``k`` actions
sampled from the policy (duplicates within a beam removed).  The candidates of one beam
are each executed on their own clone of the beam's environment first, then scored with a
single ``scorer.score_candidates(beam_history, [Step(action, observation), ...])`` call
(one packed forward for the RM scorers; the value RM reads each value at the end of the
candidate's observation, as in training).  The ``width`` best non-terminal children over all expansions become the
next beams.  A child that reaches success is returned at once (the best-scored one if
several succeed in the same round); children that end in failure are kept as fallbacks.
The search stops on success, when no live beam is left, or after ``max_depth`` steps; it
then returns the best-scored fallback or live beam.

Environments must be clonable (``Env.clone``; ``BabyAITextEnv`` deep-copies).  For an
environment whose state cannot be copied, wrap it so that ``clone()`` calls
:func:`agentrm.envs.base.replay` with the episode seed and the beam's actions.

Ranking uses the candidate's score as is: for a value RM that is the value of the state
after the step; an implicit PRM scorer can aggregate over the prefix itself
(``ImplicitPRMScorer(include_prefix=True)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env
from agentrm.policies.base import Policy
from agentrm.scoring import Scorer
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
) -> SearchResult:
    """Run step-level beam search on episode ``seed`` (``env`` is reset here, then left as is).

    Args:
        width: ``W``, beams kept per depth.
        k: ``K``, actions sampled per beam per step.
        max_depth: step budget (actions per beam).
        dedupe: key for removing duplicate candidates within a beam (None keeps duplicates).

    Returns:
        A :class:`SearchResult` whose ``candidates``/``scores`` are the final live beams and the
        failed fallbacks; ``stats`` counts ``env_steps``, ``policy_calls``, ``candidates_scored``,
        ``tokens_scored``, ``forward_passes``, ``depth`` and ``stop`` (``success``, ``all_done``
        or ``budget``).
    """
    if width < 1 or k < 1:
        raise ValueError(f"need width >= 1 and k >= 1, got width={width}, k={k}")
    before = scorer.counters.as_dict()
    root = _Node(env=env, history=begin_episode(env, seed, task, episode_id), score=float("nan"))
    beams, fallbacks = [root], []
    stats = {"env_steps": 0, "policy_calls": 0, "candidates_scored": 0, "depth": 0, "stop": "budget"}
    winner: _Node | None = None
    for depth in range(max_depth):
        children: list[_Node] = []
        for beam in beams:
            cands = policy.propose(beam.env, beam.history, k)
            stats["policy_calls"] += 1
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
            # Step candidates: the value RM reads the value after the observation, as in training
            scores = scorer.score_candidates(beam.history, [Step(c, obs) for c, _, obs, *_ in stepped])
            stats["candidates_scored"] += len(cands)
            for (cand, child_env, obs, reward, done, info), score in zip(stepped, scores.tolist()):
                children.append(
                    _Node(
                        env=child_env,
                        history=extend(beam.history, cand, obs),
                        score=float(score),
                        done=bool(done),
                        reward=float(reward),
                        success=bool(info.get("success", False)),
                    )
                )
        stats["depth"] = depth + 1
        won = [c for c in children if c.success]
        if won:
            winner = max(won, key=_key)
            stats["stop"] = "success"
            break
        fallbacks.extend(c for c in children if c.done)
        live = [c for c in children if not c.done]
        live.sort(key=_key, reverse=True)  # stable: ties keep expansion order
        beams = live[:width]
        if not beams:
            stats["stop"] = "all_done"
            break
    after = scorer.counters.as_dict()
    stats["tokens_scored"] = after["forward_tokens"] - before["forward_tokens"]
    stats["forward_passes"] = after["forward_passes"] - before["forward_passes"]
    if winner is not None:
        pool, chosen = [winner, *fallbacks], 0
    else:
        pool = [b for b in beams if b is not root] + fallbacks or [root]
        chosen = max(range(len(pool)), key=lambda i: (_key(pool[i]), -i))
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


def _key(node: _Node) -> float:
    """Ranking key: the score, with ``nan`` lowest."""
    return float("-inf") if node.score != node.score else node.score
