"""Test-time search guided by scorers: greedy and sampling baselines, Best-of-N, step-level beam search.

``python -m agentrm.search --config configs/search/demo.yaml`` runs the evaluation harness
(:mod:`agentrm.search.evaluate`).
"""

from agentrm.search.beam import beam_search
from agentrm.search.best_of_n import best_of_n, rank_samples, select_best
from agentrm.search.episode import SearchResult, begin_episode
from agentrm.search.greedy import greedy, sample_trajectories, sampling
from agentrm.search.oracle import OracleScorer, spec_env_factory

__all__ = [
    "OracleScorer",
    "SearchResult",
    "beam_search",
    "begin_episode",
    "best_of_n",
    "greedy",
    "rank_samples",
    "sample_trajectories",
    "sampling",
    "select_best",
    "spec_env_factory",
]
