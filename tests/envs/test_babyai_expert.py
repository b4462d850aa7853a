"""ScriptedBabyAIPolicy / RandomPolicy: protocol, determinism, noise and recovery."""

from __future__ import annotations

import pytest

from agentrm.envs.babyai import BabyAITextEnv
from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy
from agentrm.policies.base import Policy, start_history
from agentrm.policies.random_policy import RandomPolicy


def _episode(level: str, seed: int, policy, max_steps: int | None = None) -> tuple[list[str], bool]:
    env = BabyAITextEnv(level, max_steps=max_steps)
    env.reset(seed)
    done, actions = False, []
    while not done:
        action = policy.propose(env, None, 1)[0]
        actions.append(action)
        _, _, done, info = env.step(action)
    return actions, info["success"]


def test_protocol():
    assert isinstance(ScriptedBabyAIPolicy(0.1, 0), Policy)
    assert isinstance(RandomPolicy(0), Policy)
    with pytest.raises(ValueError):
        ScriptedBabyAIPolicy(1.5, 0)
    with pytest.raises(TypeError):
        ScriptedBabyAIPolicy(0.1, 0).propose(None, start_history("t", "i"), 1)


def test_deterministic_given_seed():
    a = _episode("GoToLocal", 3, ScriptedBabyAIPolicy(0.4, seed=7))
    b = _episode("GoToLocal", 3, ScriptedBabyAIPolicy(0.4, seed=7))
    c = _episode("GoToLocal", 3, ScriptedBabyAIPolicy(0.4, seed=8))
    assert a == b
    assert a[0] != c[0]


def test_propose_does_not_change_env_and_is_cached_per_state():
    env = BabyAITextEnv("GoToRedBall")
    env.reset(2)
    policy = ScriptedBabyAIPolicy(0.0, 0)
    before = env.describe()
    first = policy.propose(env, None, 3)
    assert len(set(first)) == 1  # error-free: always the expert action
    assert policy.propose(env, None, 2) == first[:2]
    assert env.describe() == before and env.history == []


def test_noisy_samples_vary_and_follow_error_rate():
    env = BabyAITextEnv("GoToRedBall")
    env.reset(4)
    expert = ScriptedBabyAIPolicy(0.0, 0).propose(env, None, 1)[0]
    samples = ScriptedBabyAIPolicy(0.3, 1).propose(env, None, 400)
    off = sum(s != expert for s in samples) / len(samples)
    assert 0.2 < off < 0.4
    assert len(set(samples)) >= 4
    assert set(samples) <= set(env.valid_actions)


@pytest.mark.parametrize("level", ["GoToObj", "PickupLoc", "PutNextLocal"])
def test_expert_recovers_from_deviations(level):
    policy = ScriptedBabyAIPolicy(0.3, seed=0)
    wins = sum(_episode(level, seed, policy)[1] for seed in range(10))
    assert wins >= 7
    assert policy.stats["replan"] > 0


def test_bot_is_rebuilt_when_steps_were_taken_without_it():
    env = BabyAITextEnv("GoToLocal")
    env.reset(6)
    policy = ScriptedBabyAIPolicy(0.0, 0)
    policy.propose(env, None, 1)
    for a in ["turn left", "turn left", "move forward"]:  # acting without asking the policy
        env.step(a)
    done = False
    while not done:
        _, _, done, info = env.step(policy.propose(env, None, 1)[0])
    assert info["success"]
    assert policy.stats["fresh_bot"] >= 2


def test_random_policy_uses_valid_actions_and_varies():
    env = BabyAITextEnv("GoToRedBall")
    env.reset(0)
    samples = RandomPolicy(3).propose(env, None, 60)
    assert set(samples) == set(env.valid_actions)
    assert RandomPolicy(3).propose(env, None, 60) == samples
