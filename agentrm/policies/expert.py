"""The environment's own scripted expert behind the generic :class:`~agentrm.policies.base.Policy` interface."""

from __future__ import annotations

from typing import Any

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env


class EnvExpertPolicy:
    """Acts with ``env.expert_policy(error_rate, seed)`` of whatever environment it is given.

    The expert is built on the first call for each environment family (BabyAI bot,
    ScienceWorld gold path, TextWorld walkthrough planner), so one policy object serves
    every spec of a mixed collection.  Deterministic given ``seed`` and the sequence of calls.

    Args:
        error_rate: probability that a sample replaces the expert's action by another valid one.
        seed: seed of the experts' sampling RNGs.
    """

    def __init__(self, error_rate: float = 0.0, seed: int = 0):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        self.error_rate = error_rate
        self.seed = seed
        self._experts: dict[str, Any] = {}

    def propose(self, env: Env | None, history: Trajectory | None = None, k: int = 1) -> list[str]:
        """``k`` samples of the environment's expert for its current state."""
        if env is None:
            raise TypeError("the expert policy needs the environment (it reads the true state)")
        family = env.spec.family if getattr(env, "spec", None) is not None else type(env).__name__
        if family not in self._experts:
            self._experts[family] = env.expert_policy(self.error_rate, self.seed)
        return self._experts[family].propose(env, history, k)
