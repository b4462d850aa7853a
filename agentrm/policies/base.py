"""The policy protocol: propose candidate next actions for the current state of an episode.

One signature serves two kinds of policies:

* **LM policies** (HF ``generate``, OpenAI-compatible endpoints) see text only.  They
  build the prompt from ``history`` (a partial :class:`~agentrm.data.schema.Trajectory`:
  ``history.to_messages()`` gives the chat so far) and ignore ``env``.
* **Environment-aware policies** (the scripted BabyAI expert used for data generation)
  read the true state from ``env``.

``propose`` must not change the environment's observable state (it may read it, clone
it, or cache planner state in env-attached companion storage).  The ``k`` candidates
are independent samples, so duplicates are allowed; deterministic given the policy's
seed and the sequence of calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env


@runtime_checkable
class Policy(Protocol):
    """Proposes next actions."""

    def propose(self, env: Env | None, history: Trajectory, k: int = 1) -> list[str]:
        """Return ``k`` sampled candidate actions (text) for the state after ``history``.

        Args:
            env: the environment in the state reached by ``history`` (may be None for
                text-only policies).
            history: the episode so far: ``instruction`` (task plus first observation)
                and the steps taken; its ``reward``/``success`` are placeholders.
            k: number of candidates to sample.
        """
        ...


def start_history(task: str, instruction: str, episode_id: str = "") -> Trajectory:
    """An empty partial trajectory to grow step by step while acting."""
    return Trajectory(id=episode_id, task=task, instruction=instruction, steps=[], reward=0.0, success=False)


def propose_many(policy: Policy, requests: Sequence[tuple[Env | None, Trajectory, int]]) -> list[list[str]]:
    """``policy.propose(env, history, k)`` for each request, in order; batched/concurrent where the policy can.

    A policy with its own ``propose_many`` (the OpenAI-compatible policy: bounded concurrent requests)
    gets all requests at once and must return what the calls one after another would (given its
    seed, for the same order of requests); others are called one request at a time, in order.
    """
    many = getattr(policy, "propose_many", None)
    if many is not None:
        return many(list(requests))
    return [policy.propose(env, history, k) for env, history, k in requests]


def batches_requests(policy: Policy) -> bool:
    """Whether ``policy`` gains from receiving many requests at once: its ``batches_requests`` attribute
    when it has one (the HF policy: ``batch_requests=True``), else whether it has its own ``propose_many``."""
    flag = getattr(policy, "batches_requests", None)
    if flag is not None:
        return bool(flag)
    return callable(getattr(policy, "propose_many", None))
