"""Monte-Carlo step values: how good is the state after each step, under a given policy?

For a main episode run with ``policy``, step ``t``'s value is the mean final reward of
``n`` independent rollouts that continue with the same policy from the state reached
after step ``t`` (a terminal step's value is its actual final reward).  Optionally,
*sibling branches* are emitted: at random states of the main episode a different action
is taken, valued the same way, and continued to termination, giving pairs of steps with
an identical prefix and different actions (for pairwise ranking accuracy).

Works with any :class:`~agentrm.envs.base.Env` whose ``clone()`` is exact and any
:class:`~agentrm.policies.base.Policy`.
"""

from __future__ import annotations

import random

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env, close_quietly
from agentrm.policies.base import Policy, start_history
from agentrm.policies.rollout import MAX_EPISODE_STEPS, Rollout, rollout

__all__ = ["MAX_EPISODE_STEPS", "Rollout", "mc_value", "rollout", "run_episode"]


def mc_value(env: Env, policy: Policy, history: Trajectory, n: int) -> tuple[float, list[Rollout]]:
    """Mean final reward of ``n`` rollouts from clones of ``env`` (which is left untouched).

    Returns:
        ``(value, rollouts)``; the first rollout records observations (callers may use
        it as a concrete continuation), the others do not.
    """
    if n < 1:
        raise ValueError(f"need at least one rollout, got n={n}")
    outs = []
    for i in range(n):
        clone = env.clone()
        try:
            outs.append(rollout(clone, policy, history, record=(i == 0)))
        finally:
            clone.close()
    return sum(o.reward for o in outs) / n, outs


def run_episode(
    env: Env,
    policy: Policy,
    seed: int,
    *,
    episode_id: str,
    task: str,
    rollouts: int = 4,
    siblings: int = 0,
    branch_seed: int = 0,
    meta: dict | None = None,
) -> list[Trajectory]:
    """Run one main episode with MC step values, plus optional sibling branches.

    Args:
        env: environment (reset here with ``seed``).
        policy: acts in the main episode, the rollouts and the branch continuations.
        seed: episode seed.
        episode_id: id of the main record; branches get ``f"{episode_id}-b{t}"``.
        task: the record's ``task`` field (e.g. ``babyai/GoToRedBall``).
        rollouts: ``n``, rollouts per value estimate; 0 leaves non-terminal steps without a value.
        siblings: number of branch records (at distinct steps; fewer if the episode is short).
        branch_seed: seeds the choice of branch points.
        meta: extra fields for every record's ``meta``.

    Returns:
        ``[main, *branches]``.  ``main.meta`` has ``group`` (= its id), ``branches`` (how
        many branch records follow) plus ``meta``; each branch's ``meta`` has ``group``,
        ``branch_at`` (index of the replaced step) and ``main_action``.
    """
    first_obs = env.reset(seed)
    instruction = f"{env.instruction}\n{first_obs}"
    hist = start_history(task, instruction, episode_id)
    before: list[Env] = []  # clone of the state before each step
    values: list[float | None] = []
    final = None
    while final is None:
        if len(hist.steps) >= MAX_EPISODE_STEPS:
            raise RuntimeError(f"episode did not end within {MAX_EPISODE_STEPS} steps")
        before.append(env.clone())
        action = policy.propose(env, hist, 1)[0]
        obs, reward, done, info = env.step(action)
        hist.steps.append(Step(action=action, observation=obs))
        if done:
            final = (float(reward), bool(info.get("success", False)))
            values.append(float(reward))
        elif rollouts == 0:  # no estimates: demonstrations only
            values.append(None)
        else:
            values.append(mc_value(env, policy, hist, rollouts)[0])
    for step, v in zip(hist.steps, values):
        step.value = v
    base_meta = dict(meta or {})
    try:
        branches = _branches(policy, hist, before, rollouts, siblings, random.Random(branch_seed), base_meta)
    finally:
        for state in before:
            close_quietly(state)
    main = Trajectory(
        id=episode_id,
        task=task,
        instruction=instruction,
        steps=hist.steps,
        reward=final[0],
        success=final[1],
        meta={"group": episode_id, "branches": len(branches), **base_meta},
    )
    return [main, *branches]


def _branches(
    policy: Policy,
    main: Trajectory,
    before: list[Env],
    rollouts: int,
    siblings: int,
    rng: random.Random,
    meta: dict,
) -> list[Trajectory]:
    """Sibling records branching off ``main`` at ``siblings`` distinct random steps."""
    out = []
    points = sorted(rng.sample(range(len(main.steps)), min(siblings, len(main.steps))))
    for t in points:
        state = before[t]
        prefix = Trajectory(
            id=main.id,
            task=main.task,
            instruction=main.instruction,
            steps=main.steps[:t],
            reward=0.0,
            success=False,
        )
        main_action = main.steps[t].action
        alt = _alternative(policy, state, prefix, main_action, rng)
        env = state.clone()
        try:
            obs, reward, done, info = env.step(alt)
            if done:
                value, cont = float(reward), Rollout([], float(reward), bool(info.get("success", False)))
            else:
                prefix.steps = [*prefix.steps, Step(action=alt, observation=obs)]
                value, outs = mc_value(env, policy, prefix, rollouts)
                cont = outs[0]
        finally:
            env.close()
        steps = [Step(s.action, s.observation, s.value) for s in main.steps[:t]]
        steps.append(Step(action=alt, observation=obs, value=value))
        steps.extend(Step(s.action, s.observation) for s in cont.steps)
        out.append(
            Trajectory(
                id=f"{main.id}-b{t}",
                task=main.task,
                instruction=main.instruction,
                steps=steps,
                reward=cont.reward,
                success=cont.success,
                meta={"group": main.id, "branch_at": t, "main_action": main_action, **meta},
            )
        )
    return out


def _alternative(policy: Policy, env: Env, prefix: Trajectory, main_action: str, rng: random.Random) -> str:
    """An action other than ``main_action``: a policy proposal if it offers one, else a random valid action."""
    for cand in policy.propose(env, prefix, 8):
        if cand != main_action:
            return cand
    others = [a for a in env.valid_actions if a != main_action]
    return rng.choice(others)
