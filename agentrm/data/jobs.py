"""Task-instance jobs shared by the collector, the tree builder and the evaluation harness.

A job is one episode of one env spec: job ``j`` of ``plan_jobs(specs, episodes)`` plays
``specs[j % len(specs)]``, episode ``j // len(specs)`` (round-robin, so a partial run
covers every spec).  Every seed of a job (environment, policy sampling, branch points)
derives from ``(base seed, task name, episode index)`` alone, so outputs do not depend
on worker counts or on resuming, and the collector, tree builder and evaluation agree
on which episode a seed plays.
"""


import zlib
from dataclasses import dataclass, field

import numpy as np

from agentrm.checks import ConfigError, at_least
from agentrm.envs.registry import EnvSpec, parse_specs


@dataclass(frozen=True)
class Job:
    """One episode of one environment spec."""

    spec: EnvSpec
    index: int

    def seeds(self, base: int) -> tuple[int, int, int]:
        """``(env_seed, policy_seed, extra_seed)``: a pure function of (base seed, task name, index).

        The task name (not the whole spec) is hashed, so changing an option such as
        ``max_steps`` keeps the same task instances.
        """
        ss = np.random.SeedSequence([base, zlib.crc32(self.spec.task.encode()), self.index])
        return tuple(int(x) for x in ss.generate_state(3))  # type: ignore[return-value]

    def episode_id(self, base: int) -> str:
        """``<task>-s<base>-<index>``, e.g. ``GoToLocal-s0-00007``."""
        return f"{self.spec.task}-s{base}-{self.index:05d}"


def plan_jobs(specs: list[EnvSpec], episodes: int) -> list[Job]:
    """All jobs in output order (round-robin over ``specs``, ``episodes`` per spec)."""
    return [Job(specs[j % len(specs)], j // len(specs)) for j in range(episodes * len(specs))]


@dataclass
class JobOptions:
    """Which episodes a command plays (shared by ``agentrm.collect`` and ``agentrm.trees``).

    Attributes:
        envs: env specs, e.g. ``babyai:GoToLocal?max_steps=24``, ``sciworld:boil@train``, ``textworld:cooking``.
        episodes: episodes (jobs) per spec.
        seed: base seed; every episode's seeds derive from ``(seed, task, episode index)`` (:class:`Job`).
    """

    envs: list[str] = field(default_factory=lambda: ["babyai:GoToRedBall?max_steps=24"])
    episodes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        at_least(self.episodes, 1, "episodes")
        try:
            specs = parse_specs(self.envs)
        except ValueError as e:
            raise ConfigError(f"envs: {e}") from None
        if not specs:
            raise ConfigError("envs: give at least one env spec (e.g. babyai:GoToLocal?max_steps=24)")

    @property
    def specs(self) -> list[EnvSpec]:
        return parse_specs(self.envs)

    def jobs(self) -> list[Job]:
        """Every job of the run, in output order."""
        return plan_jobs(self.specs, self.episodes)
