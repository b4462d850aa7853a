"""A uniformly random policy over the environment's valid actions (a baseline that mostly fails)."""

from __future__ import annotations

import random

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env


class RandomPolicy:
    """Uniformly random valid actions, deterministic given ``seed`` and the sequence of calls."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def propose(self, env: Env | None, history: Trajectory | None = None, k: int = 1) -> list[str]:
        """Sample ``k`` actions uniformly from ``env.valid_actions``."""
        if env is None:
            raise TypeError("RandomPolicy needs the environment (it samples from env.valid_actions)")
        actions = env.valid_actions
        return [self.rng.choice(actions) for _ in range(k)]
