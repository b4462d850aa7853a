"""Step-level beam search: selection by scores alone, beats greedy with an oracle, one scorer call per beam, dedupe, stopping rules."""

from __future__ import annotations

import pytest

from agentrm.envs.babyai import BabyAITextEnv
from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy
from agentrm.search.beam import beam_search
from agentrm.search.greedy import greedy
from agentrm.search.oracle import OracleScorer
from tests.search.fakes import FixedScorer, ListPolicy


class _Negated:
    """A scorer that ranks by the negated oracle value: the worst candidates score highest."""

    def __init__(self, inner):
        self.inner, self.counters, self.outcome_blind = inner, inner.counters, inner.outcome_blind

    def score_candidates(self, prefix, candidates):
        return -self.inner.score_candidates(prefix, candidates)

    def score_trajectories(self, trajs):
        return -self.inner.score_trajectories(trajs)


def test_oracle_beam_beats_noisy_greedy_and_selection_reads_only_scores():
    """With the oracle's values beam search beats greedy; with the same values negated it must do
    worse than greedy: a search that stopped on (or preferred) the environment's success flag
    would still succeed there."""
    env = BabyAITextEnv("GoToLocal", max_steps=24)
    oracle = OracleScorer(None, ScriptedBabyAIPolicy(0.0))
    g = b = worst = 0
    for seed in range(8):
        g += greedy(env, ScriptedBabyAIPolicy(0.7, seed=seed), 500 + seed).success
        res = beam_search(env, ScriptedBabyAIPolicy(0.7, seed=seed), oracle, 2, 4, 500 + seed)
        b += res.success
        assert res.scores[res.chosen] == max(res.scores)
        inv = beam_search(env, ScriptedBabyAIPolicy(0.7, seed=seed), _Negated(oracle), 2, 4, 500 + seed)
        worst += inv.success
        assert inv.scores[inv.chosen] == max(inv.scores)
    assert b >= 7 and b > g
    assert worst < g and worst <= 1


def test_finished_candidate_wins_only_by_score():
    """A finished failing candidate with the top score is returned; success elsewhere does not matter."""
    env = BabyAITextEnv("GoToRedBall", max_steps=1)  # every action ends the episode (out of steps)
    scorer = FixedScorer(cand={"pick up": 0.9, "toggle": 0.1})
    res = beam_search(env, ListPolicy(["toggle", "pick up"]), scorer, width=2, k=2, seed=0)
    assert res.trajectory.steps[-1].action == "pick up" and res.stats["stop"] == "all_done"


def test_one_scorer_call_per_beam_with_deduped_candidates():
    env = BabyAITextEnv("GoToRedBall", max_steps=5)
    policy = ListPolicy(["turn left", "Turn  Left", "pick up", "turn left"])
    scorer = FixedScorer(cand={"turn left": 1.0, "pick up": 0.5})
    res = beam_search(env, policy, scorer, width=2, k=4, seed=0, max_depth=3)
    # depth 1: one beam; later depths: two beams -> 1 + 2 + 2 calls, each with the 2 distinct actions
    assert [len(c) for c in scorer.candidate_calls] == [2] * 5
    assert scorer.candidate_calls[0] == ["turn left", "pick up"]
    assert res.stats["candidates_scored"] == 10 and res.stats["forward_passes"] == 5
    assert res.stats["stop"] == "budget" and res.stats["depth"] == 3
    assert res.trajectory.steps[0].action == "turn left" and len(res.trajectory.steps) == 3
    assert res.scores[res.chosen] == max(res.scores)


def test_all_done_returns_best_failed_fallback():
    env = BabyAITextEnv("GoToRedBall", max_steps=2)
    scorer = FixedScorer(cand={"pick up": 0.3, "toggle": 0.6})
    res = beam_search(env, ListPolicy(["pick up", "toggle"]), scorer, width=2, k=2, seed=0)
    assert res.stats["stop"] == "all_done" and not res.success
    assert len(res.trajectory.steps) == 2 and res.trajectory.steps[-1].action == "toggle"
    with pytest.raises(ValueError):
        beam_search(env, ListPolicy(["toggle"]), scorer, width=0, k=2, seed=0)


def test_beam_with_real_tiny_value_rm():
    """Integration: a (random) tiny ValueRewardModel through ValueRMScorer drives the search."""
    import torch

    from agentrm.models.backbone import build_backbone
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer
    from agentrm.scoring import ValueRMScorer
    from tests.lit.conftest import TINY_BACKBONE

    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    torch.manual_seed(0)
    model = ValueRewardModel(build_backbone(config=TINY_BACKBONE, vocab_size=len(tok)))
    scorer = ValueRMScorer(model, tok, max_length=256)
    env = BabyAITextEnv("GoToRedBall", max_steps=6)
    res = beam_search(env, ScriptedBabyAIPolicy(0.5, seed=1), scorer, 2, 3, seed=7)
    assert res.stats["candidates_scored"] > 0 and res.stats["tokens_scored"] > 0
    # cached path: per beam and depth one forward of the new prefix tokens (if any) and one of the rows
    assert res.stats["forward_passes"] <= 2 * 2 * res.stats["depth"]
    assert set(res.stats["scoring_paths"]) == {"cached"}
    assert 1 <= len(res.trajectory.steps) <= 6


def test_outcome_blind_beam_withholds_the_episode_ending_reply():
    """With an outcome-blind scorer a candidate that ends the episode is scored as a withheld step (action
    only, no reply); other candidates keep their observation. A non-blind scorer reads the reply."""

    class Recording(FixedScorer):
        def score_candidates(self, prefix, candidates):
            self.seen = [*getattr(self, "seen", []), *[(c.action, c.observation, c.withheld) for c in candidates]]
            return super().score_candidates(prefix, candidates)

    env = BabyAITextEnv("GoToRedBall", max_steps=2)  # the second step ends the episode
    scorer = Recording(cand={"turn left": 0.5, "toggle": 0.4})
    beam_search(env, ListPolicy(["turn left", "toggle"]), scorer, width=1, k=2, seed=0)
    first, second = scorer.seen[:2], scorer.seen[2:]
    assert all(obs and not held for _, obs, held in first)
    assert second and all(obs == "" and held for _, obs, held in second)
    scorer = Recording(cand={"turn left": 0.5, "toggle": 0.4}, outcome_blind=False)
    beam_search(env, ListPolicy(["turn left", "toggle"]), scorer, width=1, k=2, seed=0)
    assert all(obs and not held for _, obs, held in scorer.seen)


def test_a_scorer_without_declared_blindness_is_refused():
    class Undeclared(FixedScorer):
        def __init__(self):
            super().__init__()
            del self.outcome_blind

    with pytest.raises(AttributeError, match="outcome_blind"):
        beam_search(BabyAITextEnv("GoToRedBall", max_steps=2), ListPolicy(["toggle"]), Undeclared(), 1, 1, seed=0)
