"""Candidate and trajectory scoring for Best-of-N and step-level beam search.

Beam search asks: given a conversation so far (a :class:`~agentrm.data.schema.Trajectory` prefix) and
``K`` candidate next steps, how good is each? All candidates share the prefix. The package:

* :mod:`~agentrm.scoring.tokens`: the tokenised layout (prefix ids, candidate ids, action spans,
  truncation by the training rule), built on :mod:`agentrm.data.tokenize`'s chat boundaries;
* :mod:`~agentrm.scoring.layouts`: model inputs for the three paths (cached, packed, plain);
* :mod:`~agentrm.scoring.cache`: prefix KV caches reused across candidates and beam depths;
* :mod:`~agentrm.scoring.driver`: path choice, chunking and the work counters;
* :mod:`~agentrm.scoring.scorers`: :class:`ValueRMScorer` and :class:`ImplicitPRMScorer`.

Every path gives each candidate the score of ``prefix + candidate`` scored alone (tests: 1e-4, fp32).
Counters (:class:`ScoringCounters`): ``forward_passes`` counts model forward calls, ``forward_tokens``
the non-padding tokens fed through them, ``cached_tokens`` the prefix tokens read from a cache, and
``cached_calls``/``packed_calls``/``plain_calls`` the path each candidate-scoring call took.
"""

from agentrm.scoring.base import SCORING_PATHS, Scorer, ScoringCounters, path_calls, score_many
from agentrm.scoring.cache import PrefixCache
from agentrm.scoring.driver import CandidateScorer, PackMode, ScoringPath
from agentrm.scoring.layouts import (
    PACKABLE_ATTENTION,
    PACKABLE_MODEL_TYPES,
    ScoringLayout,
    cached_layout_many,
    cached_packed_layout,
    caching_unsupported_reason,
    packed_layout,
    packing_unsupported_reason,
    plain_layout,
)
from agentrm.scoring.scorers import ImplicitPRMScorer, ValueRMScorer
from agentrm.scoring.tokens import Candidate, CandidateTokens, tokenize_candidates

__all__ = [
    "PACKABLE_ATTENTION", "PACKABLE_MODEL_TYPES", "SCORING_PATHS", "Candidate", "CandidateScorer",
    "CandidateTokens", "ImplicitPRMScorer", "PackMode", "PrefixCache", "Scorer", "ScoringCounters",
    "ScoringLayout", "ScoringPath", "ValueRMScorer", "cached_layout_many", "cached_packed_layout",
    "caching_unsupported_reason",
    "packed_layout", "packing_unsupported_reason", "path_calls", "plain_layout", "score_many",
    "tokenize_candidates",
]
