"""Small scorers and policies for search tests (no trained model needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agentrm.data.schema import Step, Trajectory
from agentrm.scoring import ScoringCounters


class FixedScorer:
    """Trajectory ``i`` of a call scores ``scores[i]``; candidates score by a dict (default 0)."""

    def __init__(self, scores: Sequence[float] = (), cand: dict[str, float] | None = None, outcome_blind: bool = True):
        self.scores = list(scores)
        self.cand = cand or {}
        self.outcome_blind = outcome_blind
        self.counters = ScoringCounters()
        self.candidate_calls: list[list[str]] = []

    def score_candidates(self, prefix: Trajectory, candidates: Sequence[str | Step]) -> torch.Tensor:
        candidates = [c if isinstance(c, str) else c.action for c in candidates]
        self.candidate_calls.append(list(candidates))
        self.counters.candidates += len(candidates)
        self.counters.forward_passes += 1
        self.counters.forward_tokens += 10 * len(candidates)
        return torch.tensor([self.cand.get(c, 0.0) for c in candidates])

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> torch.Tensor:
        self.counters.trajectories += len(trajs)
        self.counters.forward_passes += 1
        return torch.tensor(self.scores[: len(trajs)], dtype=torch.float32)


class ListPolicy:
    """Always proposes the same candidate list (first k of it, cycling)."""

    def __init__(self, actions: Sequence[str]):
        self.actions = list(actions)

    def propose(self, env, history, k: int = 1) -> list[str]:
        return [self.actions[i % len(self.actions)] for i in range(k)]
