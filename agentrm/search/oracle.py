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
from agentrm.envs.base import Env, replay
from agentrm.envs.registry import make_env
from agentrm.policies.base import Policy
from agentrm.policies.rollout import rollout
from agentrm.scoring import ScoringCounters
from agentrm.search.episode import extend


class OracleScorer:
    """Scores by environment ground truth.

    Args:
        make_env: builds a fresh environment for a trajectory's task (default :func:`spec_env_factory`).
        policy: rollout policy for non-terminal candidates.
        rollouts: continuations averaged per candidate.

    ``counters.forward_passes`` counts rollouts; ``forward_tokens`` stays 0. It reads the ground truth by
    design, so it is never outcome-blind (``outcome_blind = False``): an upper bound, not a learned scorer.
    """

    outcome_blind = False

    def __init__(self, make_env: Callable[[Trajectory], Env] | None, policy: Policy, rollouts: int = 1):
        if rollouts < 1:
            raise ValueError(f"need rollouts >= 1, got {rollouts}")
        self.make_env = make_env or spec_env_factory()
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
        try:
            for c in candidates:
                cand = c.action if isinstance(c, Step) else c
                out.append(self._candidate_value(base, prefix, cand))
        finally:
            base.close()
        self.counters.candidates += len(candidates)
        return torch.tensor(out, dtype=torch.float32)

    def _candidate_value(self, base: Env, prefix: Trajectory, action: str) -> float:
        env = base.clone()
        try:
            obs, reward, done, _ = env.step(action)
            if done:
                return float(reward)
            hist = extend(prefix, action, obs)
            total = 0.0
            for _ in range(self.rollouts):
                sim = env.clone()
                try:
                    total += rollout(sim, self.policy, hist, record=False).reward
                finally:
                    sim.close()
                self.counters.forward_passes += 1
            return total / self.rollouts
        finally:
            env.close()

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` true final rewards (so Best-of-N with the oracle realises pass@N)."""
        self.counters.trajectories += len(trajs)
        return torch.tensor([float(t.reward) for t in trajs], dtype=torch.float32)


def spec_env_factory() -> Callable[[Trajectory], Env]:
    """``make_env`` from the trajectory's env spec (``meta["env"]``, recorded by :func:`~agentrm.search.episode.begin_episode`).

    Every call builds a new environment (the oracle closes it when done).
    """

    def make(traj: Trajectory) -> Env:
        spec = traj.meta.get("env")
        if not spec:
            raise ValueError(f"trajectory {traj.id!r}: the oracle needs meta['env'] (the env spec) to rebuild it")
        return make_env(spec)

    return make
