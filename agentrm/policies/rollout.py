"""Acting until the episode ends: the policy-meets-environment primitive used by value estimation, search and oracles."""

from __future__ import annotations

from dataclasses import dataclass

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env
from agentrm.policies.base import Policy, propose_many

MAX_EPISODE_STEPS = 10_000
"""Safety cap for environments that never terminate on their own."""


@dataclass
class Rollout:
    """The result of acting until the episode ends."""

    steps: list[Step]
    reward: float
    success: bool


def rollout(env: Env, policy: Policy, history: Trajectory, record: bool = True) -> Rollout:
    """Act with ``policy`` from ``env``'s current (non-terminal) state until the episode ends.

    ``env`` is advanced in place.  ``history`` is the episode so far (given to the policy;
    it is not modified).  With ``record=False`` observations are not kept (cheaper).

    Raises:
        RuntimeError: if the episode does not end within :data:`MAX_EPISODE_STEPS` steps.
    """
    ctx = Trajectory(
        id=history.id,
        task=history.task,
        instruction=history.instruction,
        steps=list(history.steps),
        reward=0.0,
        success=False,
    )
    new: list[Step] = []
    for _ in range(MAX_EPISODE_STEPS):
        action = policy.propose(env, ctx, 1)[0]
        obs, reward, done, info = env.step(action)
        step = Step(action=action, observation=obs if record else "")
        ctx.steps.append(step)
        new.append(step)
        if done:
            return Rollout(steps=new, reward=float(reward), success=bool(info.get("success", False)))
    raise RuntimeError(f"episode did not end within {MAX_EPISODE_STEPS} steps")


def rollout_many(envs: list[Env], policy: Policy, histories: list[Trajectory], record: bool = True) -> list[Rollout]:
    """:func:`rollout` of every ``(envs[i], histories[i])`` in lock-step: one :func:`propose_many` per step.

    All live episodes' proposals go to the policy together, in index order, so a served policy works on
    them concurrently; each env is advanced in place until its episode ends.
    """
    ctxs = [
        Trajectory(id=h.id, task=h.task, instruction=h.instruction, steps=list(h.steps), reward=0.0, success=False)
        for h in histories
    ]
    new: list[list[Step]] = [[] for _ in envs]
    out: list[Rollout | None] = [None] * len(envs)
    live = list(range(len(envs)))
    for _ in range(MAX_EPISODE_STEPS):
        if not live:
            return out  # type: ignore[return-value]
        actions = propose_many(policy, [(envs[i], ctxs[i], 1) for i in live])
        still = []
        for i, acts in zip(live, actions):
            obs, reward, done, info = envs[i].step(acts[0])
            step = Step(action=acts[0], observation=obs if record else "")
            ctxs[i].steps.append(step)
            new[i].append(step)
            if done:
                out[i] = Rollout(steps=new[i], reward=float(reward), success=bool(info.get("success", False)))
            else:
                still.append(i)
        live = still
    raise RuntimeError(f"episode did not end within {MAX_EPISODE_STEPS} steps")
