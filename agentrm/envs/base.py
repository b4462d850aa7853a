"""The text-environment protocol shared by the offline BabyAI env and remote (AgentGym) envs.

An environment speaks text both ways: :meth:`Env.reset` and :meth:`Env.step` return
observation strings, and actions are free text that the environment parses itself
(so an LM's raw output can be passed straight in).  Tree search and Monte-Carlo value
estimation need to branch from an intermediate state, hence :meth:`Env.clone`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Env(Protocol):
    """A text environment with an episode-local state that can be copied.

    Contract:
        * ``reset(seed)`` starts a new episode; the same seed gives the same episode.
        * ``step(action)`` returns ``(observation, reward, done, info)``; ``info`` has at
          least ``{"success": bool}``.  An action the environment cannot parse is not an
          error: it yields feedback text as the observation and reward 0.
        * ``clone()`` returns an independent environment in exactly the current state:
          stepping the clone never affects the original and vice versa, and the same
          actions give the same observations and rewards in both.  Implementations choose
          how (deep copy, server-side snapshot, or :func:`replay` of seed + actions) and
          document it.
    """

    @property
    def instruction(self) -> str:
        """Task description of the current episode (mission plus the action vocabulary)."""
        ...

    @property
    def valid_actions(self) -> list[str]:
        """The canonical action strings, e.g. for prompts and for random exploration."""
        ...

    def reset(self, seed: int) -> str:
        """Start the episode determined by ``seed``; return the first observation."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply a text action; return ``(observation, reward, done, info)``."""
        ...

    def clone(self) -> Env:
        """Return an independent copy of the environment in its current state."""
        ...


def replay(env_factory: Callable[[], Env], seed: int, actions: Iterable[str]) -> Env:
    """Rebuild an episode's state by resetting a fresh env with ``seed`` and re-applying ``actions``.

    This is the generic ``clone`` fallback for environments whose state cannot be
    copied in memory (e.g. a remote server); it is exact for deterministic
    environments.  It restores the environment only: state that lives outside it
    (a policy's planner cache, for instance) is not reproduced.

    Raises:
        RuntimeError: if the episode ends before all actions were applied.
    """
    env = env_factory()
    env.reset(seed)
    actions = list(actions)
    for i, action in enumerate(actions):
        _, _, done, _ = env.step(action)
        if done and i != len(actions) - 1:
            raise RuntimeError(f"episode ended after {i + 1} of {len(actions)} replayed actions")
    return env
