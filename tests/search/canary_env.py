"""A canary environment family for outcome-blindness tests: every reply that ends an episode carries :data:`TOKEN`.

A corridor: the flag is 2 or 3 steps ahead (by seed); ``forward`` walks, ``grab`` ends the episode (won at
the flag, lost elsewhere), ``wait`` does nothing; the episode also ends after ``max_steps`` actions. Only
the reply to an episode-ending step holds :data:`TOKEN` (nothing else does), so a scorer that ever sees it
has seen what a finished step returned. Registered as family ``canary`` by :func:`register_canary`.
"""

from __future__ import annotations

import copy
from typing import Any

from agentrm.envs.base import NoisyExpert
from agentrm.envs.registry import EnvSpec, register

TOKEN = "zqxcanaryzqx"
ACTIONS = ["forward", "grab", "wait"]


class CanaryExpert(NoisyExpert):
    def propose(self, env: CanaryEnv, history: Any = None, k: int = 1) -> list[str]:
        best = "grab" if env.pos == env.dist else "forward"
        return self.sample(best, lambda: list(ACTIONS), k)


class CanaryEnv:
    clone_mode = "copy"

    def __init__(self, spec: EnvSpec):
        self.spec = spec
        self.max_steps = int(spec.option("max_steps", 5))
        self.closed = False
        self.pos = self.dist = self.t = 0

    @property
    def instruction(self) -> str:
        return "Walk forward to the flag, then grab it."

    @property
    def valid_actions(self) -> list[str]:
        return list(ACTIONS)

    def reset(self, seed: int) -> str:
        self.dist, self.pos, self.t = 2 + seed % 2, 0, 0
        return f"The flag is {self.dist} steps ahead."

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        self.t += 1
        a = action.strip().lower()
        if a == "grab":
            won = self.pos == self.dist
            return f"You grab {'the flag' if won else 'nothing'}. {TOKEN}", float(won), True, {"success": won}
        if a == "forward":
            self.pos = min(self.pos + 1, self.dist)
        obs = f"The flag is {self.dist - self.pos} steps ahead." if a in ACTIONS else "Nothing happens."
        if self.t >= self.max_steps:
            return f"Out of steps. {TOKEN}", 0.0, True, {"success": False}
        return obs, 0.0, False, {"success": False}

    def clone(self) -> CanaryEnv:
        return copy.copy(self)

    def close(self) -> None:
        self.closed = True

    def expert_policy(self, error_rate: float = 0.0, seed: int = 0) -> CanaryExpert:
        return CanaryExpert(error_rate, seed)

    def instance_key(self, seed: int) -> str:
        return f"canary:{self.spec.task}#{seed}"


def register_canary() -> None:
    register("canary", CanaryEnv)
