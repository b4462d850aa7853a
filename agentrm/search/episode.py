"""Shared pieces of the search methods: starting an episode, sampling a trajectory, the result type.

The episode convention mirrors :func:`agentrm.targets.monte_carlo.run_episode`, which
produced the reward models' training data: ``instruction = f"{env.instruction}\\n{first_obs}"``
and one :class:`~agentrm.data.schema.Step` per action with the environment's reply, so
the reward model sees at search time exactly the text layout it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env
from agentrm.policies.base import Policy, start_history
from agentrm.policies.rollout import Rollout, rollout


@dataclass
class SearchResult:
    """Outcome of one search episode.

    Attributes:
        method: ``greedy``, ``sampling``, ``best_of_n`` or ``beam``.
        trajectory: the returned (chosen) trajectory, with the environment's true outcome.
        candidates: trajectories the method chose from (Best-of-N: all samples; beam: the
            final beams and finished fallbacks).
        scores: scorer scores of ``candidates`` (same order; empty when unscored).
        chosen: index of ``trajectory`` in ``candidates``.
        stats: work counters, e.g. ``env_steps``, ``policy_calls``, ``candidates_scored``.
    """

    method: str
    trajectory: Trajectory
    candidates: list[Trajectory] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    chosen: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.trajectory.success

    @property
    def reward(self) -> float:
        return self.trajectory.reward


def begin_episode(env: Env, seed: int, task: str, episode_id: str = "") -> Trajectory:
    """Reset ``env`` with ``seed``; return the empty history (instruction = task text + first observation).

    ``history.meta`` records ``seed`` and the env spec (``env``) so that scorers needing the
    true state (the oracle) can :func:`~agentrm.envs.base.replay` it.
    """
    first_obs = env.reset(seed)
    hist = start_history(task, f"{env.instruction}\n{first_obs}", episode_id)
    hist.meta = {"seed": int(seed)}
    if getattr(env, "spec", None) is not None:
        hist.meta["env"] = str(env.spec)
    return hist


def extend(history: Trajectory, action: str, observation: str) -> Trajectory:
    """A new partial trajectory: ``history`` plus one step (``history`` is not modified)."""
    return continued(history, [Step(action=action, observation=observation)])


def continued(history: Trajectory, steps: list[Step]) -> Trajectory:
    """A new unfinished trajectory: ``history`` followed by ``steps`` (no outcome yet; ``history`` is not modified)."""
    return dataclasses.replace(history, steps=[*history.steps, *steps], reward=0.0, success=False,
                               meta=dict(history.meta))


def finish(history: Trajectory, reward: float, success: bool, ended: bool = True, **meta: Any) -> Trajectory:
    """``history`` with the environment's outcome.

    Args:
        ended: whether the episode ended with the last step (the environment's ``done``), recorded as
            ``meta["ended"]``: an outcome-blind scorer never sees what that step returned
            (:mod:`agentrm.search.blind`). A beam cut off by its step budget has ``ended=False``.
    """
    return dataclasses.replace(history, steps=list(history.steps), reward=float(reward), success=bool(success),
                               meta={**history.meta, **meta, "ended": bool(ended)})


def sample_trajectory(env: Env, policy: Policy, history: Trajectory, **meta: Any) -> Trajectory:
    """Act with ``policy`` (one proposal per step) from ``env``'s state until the episode ends.

    ``env`` is advanced in place; pass a clone to keep the original.
    """
    return finished_rollout(history, rollout(env, policy, history, record=True), **meta)


def finished_rollout(history: Trajectory, out: Rollout, **meta: Any) -> Trajectory:
    """The finished trajectory of ``history`` continued by a :class:`~agentrm.policies.rollout.Rollout`."""
    return finish(continued(history, out.steps), out.reward, out.success, ended=True, **meta)
