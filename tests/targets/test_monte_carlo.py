"""Monte-Carlo step values and sibling branches."""

from __future__ import annotations

import pytest

from agentrm.envs.babyai import BabyAITextEnv
from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy
from agentrm.policies.base import start_history
from agentrm.targets.monte_carlo import mc_value, rollout, run_episode


def _episode(
    seed: int, error_rate: float = 0.5, siblings: int = 0, rollouts: int = 3, level: str = "GoToLocal"
):
    return run_episode(
        BabyAITextEnv(level, max_steps=20),
        ScriptedBabyAIPolicy(error_rate, seed=seed),
        seed,
        episode_id=f"ep{seed}",
        task=f"babyai/{level}",
        rollouts=rollouts,
        siblings=siblings,
        branch_seed=seed,
        meta={"level": level},
    )


def test_values_in_range_and_terminal_equals_outcome():
    outcomes = set()
    for seed in range(8):
        (main,) = _episode(seed, error_rate=0.7)
        assert main.meta == {"group": f"ep{seed}", "branches": 0, "level": "GoToLocal"}
        assert all(s.value is not None and 0.0 <= s.value <= 1.0 for s in main.steps)
        assert main.steps[-1].value == pytest.approx(main.reward)
        assert main.success == (main.reward > 0)
        assert main.instruction.startswith("Mission: go to")
        outcomes.add(main.success)
    assert outcomes == {True, False}


def test_expert_values_are_high_and_random_values_low():
    (good,) = _episode(1, error_rate=0.0)
    (bad,) = _episode(1, error_rate=1.0)
    assert good.success and min(s.value for s in good.steps) > 0.5
    assert sum(s.value for s in bad.steps) / len(bad.steps) < sum(s.value for s in good.steps) / len(
        good.steps
    )


def test_deterministic():
    assert [t.to_dict() for t in _episode(4, siblings=2)] == [t.to_dict() for t in _episode(4, siblings=2)]


def test_mc_value_leaves_env_untouched_and_averages_rollouts():
    env = BabyAITextEnv("GoToRedBall", max_steps=20)
    first = env.reset(3)
    policy = ScriptedBabyAIPolicy(0.5, seed=0)
    hist = start_history("t", first)
    value, outs = mc_value(env, policy, hist, 5)
    assert env.history == [] and env.describe() == first
    assert len(outs) == 5 and value == pytest.approx(sum(o.reward for o in outs) / 5)
    assert outs[0].steps[0].observation and not outs[1].steps[0].observation
    with pytest.raises(ValueError):
        mc_value(env, policy, hist, 0)
    done = rollout(env, policy, hist)
    assert env.done and 0.0 <= done.reward <= 1.0 and hist.steps == [] and done.steps


def test_siblings_share_prefix_and_differ_at_branch():
    n_checked = 0
    for seed in range(4):
        main, *branches = _episode(seed, siblings=2)
        assert main.meta["branches"] == len(branches) == min(2, len(main.steps))
        for b in branches:
            t = b.meta["branch_at"]
            assert b.meta["group"] == main.id and b.id != main.id
            assert b.instruction == main.instruction
            assert [s.to_dict() for s in b.steps[:t]] == [s.to_dict() for s in main.steps[:t]]
            assert b.steps[t].action != main.steps[t].action == b.meta["main_action"]
            assert 0.0 <= b.steps[t].value <= 1.0
            assert all(s.value is None for s in b.steps[t + 1 :])
            if t + 1 < len(b.steps):  # continued: the outcome is the continuation's
                assert b.success == (b.reward > 0)
            else:  # the alternative action ended the episode
                assert b.steps[t].value == pytest.approx(b.reward)
            n_checked += 1
    assert n_checked >= 6
