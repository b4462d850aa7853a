"""Baselines without a reward model: greedy (one proposal per step) and plain sampling."""

from __future__ import annotations

import random
import time

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env
from agentrm.policies.base import Policy, batches_requests
from agentrm.policies.rollout import rollout_many
from agentrm.search.episode import SearchResult, begin_episode, finished_rollout, sample_trajectory


def greedy(env: Env, policy: Policy, seed: int, *, task: str = "", episode_id: str = "") -> SearchResult:
    """Play one episode taking the policy's single proposal at every step.

    "Greedy" means the policy as configured: an LM policy built with temperature 0
    decodes greedily; the scripted policy keeps its error rate.
    """
    hist = begin_episode(env, seed, task, episode_id)
    traj = sample_trajectory(env, policy, hist)
    return SearchResult(
        method="greedy",
        trajectory=traj,
        candidates=[traj],
        chosen=0,
        stats={"env_steps": len(traj.steps), "policy_calls": len(traj.steps), "candidates_scored": 0},
    )


def sample_trajectories(
    env: Env, policy: Policy, n: int, seed: int, *, task: str = "", episode_id: str = ""
) -> list[Trajectory]:
    """``n`` independent trajectories of the episode ``seed``, each from a clone of the reset env.

    ``env`` is left in the episode's initial state.  Each trajectory's ``meta`` has
    ``sample`` (its index) and ``wall_s`` (seconds spent sampling it; in lock-step, the mean).
    A policy that batches requests (:func:`~agentrm.policies.base.batches_requests`) samples the ``n``
    trajectories in lock-step, all live samples' proposals in one ``propose_many`` per step (in sample
    order, so the result does not depend on its concurrency); others sample one trajectory after another.
    """
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    hist = begin_episode(env, seed, task, episode_id)
    if batches_requests(policy):  # a served policy: the n samples advance together (lock-step)
        t0 = time.perf_counter()
        clones = [env.clone() for _ in range(n)]
        try:
            rolls = rollout_many(clones, policy, [hist] * n)
        finally:
            for c in clones:
                c.close()
        wall = (time.perf_counter() - t0) / n
        return [finished_rollout(hist, r, sample=i, wall_s=wall) for i, r in enumerate(rolls)]
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        traj = sample_trajectory(env.clone(), policy, hist)
        traj.meta.update(sample=i, wall_s=time.perf_counter() - t0)
        out.append(traj)
    return out


def sampling(
    env: Env, policy: Policy, n: int, seed: int, *, pick_seed: int = 0, task: str = "", episode_id: str = ""
) -> SearchResult:
    """Sample ``n`` trajectories and return a uniformly random one (no scorer).

    ``stats["mean_success"]`` and ``stats["mean_reward"]`` give the expectation over the
    samples, the less noisy estimate of a single sample's success.
    """
    trajs = sample_trajectories(env, policy, n, seed, task=task, episode_id=episode_id)
    chosen = random.Random(pick_seed).randrange(n)
    steps = sum(len(t.steps) for t in trajs)
    return SearchResult(
        method="sampling",
        trajectory=trajs[chosen],
        candidates=trajs,
        chosen=chosen,
        stats={
            "env_steps": steps,
            "policy_calls": steps,
            "candidates_scored": 0,
            "mean_success": sum(t.success for t in trajs) / n,
            "mean_reward": sum(t.reward for t in trajs) / n,
        },
    )
