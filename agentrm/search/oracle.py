"""The oracle scorer: Monte-Carlo ground truth from the environment (an upper bound for learned scorers).

It implements the :class:`~agentrm.scoring.Scorer` protocol but, unlike a reward model,
reads the true state: the prefix's episode is rebuilt with
:func:`~agentrm.envs.base.replay` from ``prefix.meta["seed"]`` and its actions, each
candidate is executed, and its value is the mean final reward of ``rollouts``
continuations by a rollout policy (the same quantity the value RM is trained to
predict, when the rollout policy is the data-collection policy).  Finished trajectories
score their true reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.babyai import BabyAITextEnv
from agentrm.envs.base import Env, replay
from agentrm.policies.base import Policy
from agentrm.scoring import ScoringCounters
from agentrm.search.episode import extend
from agentrm.targets.monte_carlo import rollout


class OracleScorer:
    """Scores by environment ground truth.

    Args:
        make_env: builds a fresh environment for a trajectory's task (see :func:`babyai_env_factory`).
        policy: rollout policy for non-terminal candidates.
        rollouts: continuations averaged per candidate.

    ``counters.forward_passes`` counts rollouts; ``forward_tokens`` stays 0.
    """

    def __init__(self, make_env: Callable[[Trajectory], Env], policy: Policy, rollouts: int = 1):
        if rollouts < 1:
            raise ValueError(f"need rollouts >= 1, got {rollouts}")
        self.make_env = make_env
        self.policy = policy
        self.rollouts = rollouts
        self.counters = ScoringCounters()

    def state(self, prefix: Trajectory) -> Env:
        """The environment in the state reached by ``prefix`` (rebuilt by replay)."""
        if "seed" not in prefix.meta:
            raise ValueError(f"trajectory {prefix.id!r}: the oracle needs meta['seed'] to replay the episode")
        return replay(
            lambda: self.make_env(prefix), int(prefix.meta["seed"]), [s.action for s in prefix.steps]
        )

    def score_candidates(self, prefix: Trajectory, candidates: Sequence[str | Step]) -> Tensor:
        """``[K]`` MC values of the states after each candidate (terminal: the final reward).

        A :class:`Step` candidate is re-executed from its action (its observation is not needed).
        """
        base = self.state(prefix)
        out = []
        for c in candidates:
            cand = c.action if isinstance(c, Step) else c
            env = base.clone()
            obs, reward, done, _ = env.step(cand)
            if done:
                out.append(float(reward))
                continue
            hist = extend(prefix, cand, obs)
            total = 0.0
            for _ in range(self.rollouts):
                total += rollout(env.clone(), self.policy, hist, record=False).reward
                self.counters.forward_passes += 1
            out.append(total / self.rollouts)
        self.counters.candidates += len(candidates)
        return torch.tensor(out, dtype=torch.float32)

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` true final rewards (so Best-of-N with the oracle realises pass@N)."""
        self.counters.trajectories += len(trajs)
        return torch.tensor([float(t.reward) for t in trajs], dtype=torch.float32)


def babyai_env_factory(max_steps: int | None = None) -> Callable[[Trajectory], Env]:
    """``make_env`` for BabyAI: the level is ``meta["level"]``, else read from ``task`` (``babyai/<Level>``).

    One env per level is reused (``replay`` resets it).
    """
    cache: dict[str, BabyAITextEnv] = {}

    def make(traj: Trajectory) -> Env:
        level = str(traj.meta.get("level") or traj.task.split("/", 1)[-1])
        if level not in cache:
            cache[level] = BabyAITextEnv(level, max_steps=max_steps)
        return cache[level]

    return make
