"""Task-instance jobs shared by the collector, the tree builder and the evaluation harness.

A job is one episode of one env spec: job ``j`` of ``plan_jobs(specs, episodes)`` plays
``specs[j % len(specs)]``, episode ``j // len(specs)`` (round-robin, so a partial run
covers every spec).  Every seed of a job (environment, policy sampling, branch points)
derives from ``(base seed, task name, episode index)`` alone, so outputs do not depend
on worker counts or on resuming, and the collector, tree builder and evaluation agree
on which episode a seed plays.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from agentrm.envs.registry import EnvSpec


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
