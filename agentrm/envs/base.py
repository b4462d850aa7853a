"""The text-environment protocol shared by every environment family (BabyAI, ScienceWorld, TextWorld, AgentGym).

An environment speaks text both ways: :meth:`Env.reset` and :meth:`Env.step` return
observation strings, and actions are free text that the environment parses itself
(so an LM's raw output can be passed straight in).  Tree search and Monte-Carlo value
estimation need to branch from an intermediate state, hence :meth:`Env.clone`; clones
and finished episodes are released with :meth:`Env.close`.

Environments are built from *env specs* (``babyai:GoToLocal``, ``sciworld:boil@train``)
by :func:`agentrm.envs.registry.make_env`; nothing above this package names a concrete
environment.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # the policy protocol lives one layer up; only its shape is needed here
    from agentrm.envs.registry import EnvSpec

CloneMode = Literal["copy", "replay"]
"""How :meth:`Env.clone` reproduces a state: an in-memory ``copy`` (cheap, exact) or a
``replay`` of seed + actions on a fresh or pooled backend (cost grows with the episode length)."""


@runtime_checkable
class ExpertPolicy(Protocol):
    """An environment's own scripted expert (BabyAI bot, ScienceWorld gold path, TextWorld walkthrough).

    It satisfies :class:`agentrm.policies.base.Policy`: ``propose(env, history, k)``
    returns ``k`` sampled actions for ``env``'s current state.  Each sample is the
    expert's action with probability ``1 - error_rate``, otherwise another valid action.
    """

    error_rate: float

    def propose(self, env: Any, history: Any = None, k: int = 1) -> list[str]: ...


class NoisyExpert:
    """The sampling every family's expert shares: the expert's action, or with probability
    ``error_rate`` a uniformly random *other* candidate action (diverse data for value targets).

    Subclasses compute the expert's action for a state and call :meth:`sample`.  Deterministic
    given ``seed`` and the sequence of calls.
    """

    def __init__(self, error_rate: float = 0.0, seed: int = 0):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        self.error_rate = error_rate
        self.rng = random.Random(seed)

    def sample(self, best: str | None, candidates: Callable[[], list[str]], k: int) -> list[str]:
        """``k`` samples around ``best``.

        Args:
            best: the expert's action (None: it has none; samples are then uniform over the candidates).
            candidates: the actions a deviation may take, computed at most once and only when a
                sample deviates (valid-action lists can be costly).
            k: number of samples.
        """
        pool: list[str] | None = None
        out = []
        for _ in range(k):
            if best is not None and not (self.error_rate > 0 and self.rng.random() < self.error_rate):
                out.append(best)
                continue
            if pool is None:
                pool = [a for a in candidates() if a != best]
            out.append(self.rng.choice(pool) if pool else best)
        return out


@runtime_checkable
class Env(Protocol):
    """A text environment with an episode-local state that can be copied.

    Contract (checked for every registered family by ``tests/envs/test_contract.py``):
        * ``reset(seed)`` starts a new episode; the same seed gives the same episode.
        * ``step(action)`` returns ``(observation, reward, done, info)``; ``info`` has at
          least ``{"success": bool}``.  ``reward`` is the progress so far in ``[0, 1]``
          when the family has a progress score (ScienceWorld), else the family's own reward;
          the final step's reward is the episode's reward.  An action the environment
          cannot parse (or will not take) is not an error: it yields feedback text as the
          observation and reward 0, unless it ends the episode (then the final-step rule holds);
          ``info["progress"]``, where a family has progress, always carries it.
        * ``clone()`` returns an independent environment in exactly the current state:
          stepping the clone never affects the original and vice versa, and the same
          actions give the same observations and rewards in both.  :attr:`clone_mode`
          says how (``copy`` or ``replay``); each family documents the cost.
        * ``close()`` releases what the environment holds (a JVM slot, a game process, a
          server instance); it is idempotent, and a closed env is not used again.
        * ``expert_policy(error_rate, seed)`` returns the family's scripted expert.
        * ``instance_key(seed)`` names the task instance ``reset(seed)`` plays (used to
          check that training and evaluation never share task instances).
    """

    spec: EnvSpec
    """The spec this environment was built from (family, task, split, options)."""

    clone_mode: CloneMode

    closed: bool
    """True once :meth:`close` ran."""

    @property
    def instruction(self) -> str:
        """Task description of the current episode (goal plus how to act)."""
        ...

    @property
    def valid_actions(self) -> list[str]:
        """Actions valid in the current state (may be costly: call only when needed)."""
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

    def close(self) -> None:
        """Release the environment's resources (idempotent)."""
        ...

    def expert_policy(self, error_rate: float = 0.0, seed: int = 0) -> ExpertPolicy:
        """The family's scripted expert with injected errors (for data generation and rollouts)."""
        ...

    def instance_key(self, seed: int) -> str:
        """A stable name of the task instance that ``reset(seed)`` plays, e.g. ``sciworld:boil#var=3``."""
        ...


def replay(env_factory: Callable[[], Env], seed: int, actions: Iterable[str]) -> Env:
    """Rebuild an episode's state by resetting a fresh env with ``seed`` and re-applying ``actions``.

    This is the generic ``clone`` fallback for environments whose state cannot be
    copied in memory (e.g. a remote server or a JVM simulator); it is exact for
    deterministic environments.  It restores the environment only: state that lives
    outside it (a policy's planner cache, for instance) is not reproduced.

    Raises:
        RuntimeError: if the episode ends before all actions were applied (the new env is closed first).
    """
    env = env_factory()
    env.reset(seed)
    actions = list(actions)
    for i, action in enumerate(actions):
        _, _, done, _ = env.step(action)
        if done and i != len(actions) - 1:
            close_quietly(env)
            raise RuntimeError(f"episode ended after {i + 1} of {len(actions)} replayed actions")
    return env


def close_quietly(env: Any) -> None:
    """``env.close()`` when the env has one; errors while releasing are not raised (best effort)."""
    close = getattr(env, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:  # noqa: BLE001 - releasing must never mask the caller's own error
        pass
