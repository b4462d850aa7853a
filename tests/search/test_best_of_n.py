"""Best-of-N: argmax selection, tie-breaking, environment in the loop, oracle = pass@N."""

from __future__ import annotations

import math
import random

import pytest

from agentrm.envs.babyai import BabyAITextEnv
from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy
from agentrm.search.best_of_n import best_of_n, rank_samples, select_best
from agentrm.search.greedy import greedy, sample_trajectories, sampling
from agentrm.search.oracle import OracleScorer
from tests.conftest import make_trajectory
from tests.search.fakes import FixedScorer


def test_select_best_argmax_and_ties():
    assert select_best([0.1, 0.7, 0.3]) == 1
    assert select_best([math.nan, 0.2, math.nan]) == 1
    assert select_best([math.nan, math.nan]) == 0
    trajs = [make_trajectory("a", 4), make_trajectory("b", 2), make_trajectory("c", 3)]
    assert select_best([0.5, 0.5, 0.5], trajs, "first") == 0
    assert select_best([0.5, 0.5, 0.5], trajs, "shortest") == 1
    picks = {select_best([0.5, 0.1, 0.5], trajs, "random", random.Random(s)) for s in range(20)}
    assert picks == {0, 2}
    with pytest.raises(ValueError):
        select_best([], None)


def test_samples_start_from_the_same_episode_and_greedy_equals_first_sample():
    env = BabyAITextEnv("GoToRedBall", max_steps=24)
    samples = sample_trajectories(
        env, ScriptedBabyAIPolicy(0.7, seed=3), 4, seed=11, task="babyai/GoToRedBall"
    )
    assert len({t.instruction for t in samples}) == 1
    assert all(t.meta["seed"] == 11 and t.steps for t in samples)
    assert samples[0].instruction.startswith(env.instruction.split(" Actions")[0])
    g = greedy(env, ScriptedBabyAIPolicy(0.7, seed=3), seed=11, task="babyai/GoToRedBall")
    assert [s.action for s in g.trajectory.steps] == [s.action for s in samples[0].steps]
    s = sampling(env, ScriptedBabyAIPolicy(0.7, seed=3), 4, seed=11)
    assert s.stats["mean_success"] == sum(t.success for t in samples) / 4


def test_best_of_n_picks_the_argmax_of_the_scorer():
    env = BabyAITextEnv("GoToRedBall", max_steps=24)
    scorer = FixedScorer([0.2, 0.9, 0.1, 0.5])
    res = best_of_n(env, ScriptedBabyAIPolicy(0.7, seed=0), scorer, 4, seed=5)
    assert res.chosen == 1 and res.trajectory is res.candidates[1]
    assert res.scores == pytest.approx([0.2, 0.9, 0.1, 0.5])
    assert res.stats["candidates_scored"] == 4 and res.stats["forward_passes"] == 1
    assert res.success == res.candidates[1].success


def test_oracle_best_of_n_realises_pass_at_n():
    env = BabyAITextEnv("GoToLocal", max_steps=24)
    oracle = OracleScorer(None, ScriptedBabyAIPolicy(0.0))
    hits = 0
    for seed in range(6):
        samples = sample_trajectories(env, ScriptedBabyAIPolicy(0.7, seed=seed), 4, seed=100 + seed)
        res = rank_samples(samples, oracle)
        assert res.success == res.stats["pass"] == any(t.success for t in samples)
        assert res.reward == max(t.reward for t in samples)
        hits += res.success
    assert hits >= 3
