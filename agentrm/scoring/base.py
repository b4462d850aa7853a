"""The scorer protocol and the work counters every scorer (RMs, judge, oracle) keeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from agentrm.data.schema import Trajectory
from agentrm.scoring.tokens import Candidate

SCORING_PATHS = ("cached", "packed", "plain")


@dataclass
class ScoringCounters:
    """Work done by a scorer since construction or :meth:`reset`.

    Attributes:
        forward_passes: model forward calls (the implicit PRM makes two per batch: policy and reference;
            the cached path one more per model when the prefix is extended).
        forward_tokens: non-padding tokens fed through them.
        padded_tokens: ``B * T`` summed over forward passes (``== forward_tokens`` when packed).
        cached_tokens: prefix tokens read from a KV cache instead of being forwarded (per model).
        cached_calls / packed_calls / plain_calls: candidate-scoring calls by the path they took.
        cache_evictions: prefix-cache entries evicted to stay within the byte budget (not the entry cap's LRU turnover)
            (:class:`~agentrm.scoring.cache.PrefixCache`).
        cache_oversized: prefix-cache entries not stored because one alone exceeds the byte budget.
        cache_peak_bytes: the most bytes the prefix cache held after a store (a high-water mark, not a
            sum: the difference of two snapshots is how much the mark rose between them).
        server_wait_ms: milliseconds spent waiting for a scoring server's answers (the remote scorer,
            :mod:`agentrm.scoring.remote`; 0 for in-process scorers).
    """

    candidates: int = 0
    trajectories: int = 0
    forward_passes: int = 0
    forward_tokens: int = 0
    padded_tokens: int = 0
    cached_tokens: int = 0
    cached_calls: int = 0
    packed_calls: int = 0
    plain_calls: int = 0
    cache_evictions: int = 0
    cache_oversized: int = 0
    cache_peak_bytes: int = 0
    server_wait_ms: int = 0

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def path_calls(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Candidate-scoring calls per path between two :meth:`ScoringCounters.as_dict` snapshots (non-zero only)."""
    out = {p: after.get(f"{p}_calls", 0) - before.get(f"{p}_calls", 0) for p in SCORING_PATHS}
    return {p: n for p, n in out.items() if n}


@runtime_checkable
class Scorer(Protocol):
    """Scores candidate next steps and whole trajectories (higher is better).

    Every scorer declares :attr:`outcome_blind`. The search layer (:mod:`agentrm.search.blind`, the one
    place that does it) reads it and, for a blind scorer, withholds what a step that ended the episode
    returned: such a step reaches the scorer as ``Step(action, "", withheld=True)``. A scorer documents how
    it reads a withheld step; it never sees the environment's reply to it, nor its reward or success.
    """

    counters: ScoringCounters
    outcome_blind: bool
    """``True``: this scorer must not see what a finished step returned (the default of every learned
    scorer and judge in the search harness; ``ScorerSpec.outcome_blind``). ``False``: it may (an oracle,
    or a deliberately outcome-reading baseline)."""

    def score_candidates(self, prefix: Trajectory, candidates: Sequence[Candidate]) -> Tensor:
        """``[K]`` scores of appending each candidate as the step after ``prefix.steps``.

        A candidate is an action string or a :class:`~agentrm.data.schema.Step` (action and the
        observation the environment returned for it).  The value RM needs the observation: it scores the
        state a step reaches, read at the end of that observation, as in training.
        """
        ...

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` whole-trajectory scores (each scorer documents what it does with a trajectory that has
        no step it can read; the RM scorers and the judge never return ``nan`` for it)."""
        ...


def score_many(scorer: Scorer, requests: Sequence[tuple[Trajectory, Sequence[Candidate]]]) -> list[Tensor]:
    """``scorer.score_candidates(prefix, candidates)`` for each request, in order; in shared forwards where
    the scorer can (the RM scorers' ``score_candidates_many`` on the cached path), else one call each."""
    many = getattr(scorer, "score_candidates_many", None)
    if many is not None:
        return many(list(requests))
    return [scorer.score_candidates(prefix, cands) for prefix, cands in requests]
