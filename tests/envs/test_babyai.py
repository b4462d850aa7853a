"""BabyAITextEnv: levels, text observations, actions, invalid input, clone and replay."""

from __future__ import annotations

import pytest

from agentrm.envs.babyai import BabyAITextEnv, available_levels, normalize_action
from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy
from agentrm.envs.base import Env, replay
from agentrm.policies.random_policy import RandomPolicy


def test_is_env_and_lists_levels():
    env = BabyAITextEnv("GoToRedBall")
    assert isinstance(env, Env)
    levels = available_levels()
    for name in [
        "GoToRedBallGrey",
        "GoToRedBall",
        "GoToObj",
        "GoToLocal",
        "PickupLoc",
        "PutNextLocal",
        "OpenDoor",
    ]:
        assert name in levels
    with pytest.raises(ValueError, match="GoToLocal"):
        BabyAITextEnv("NoSuchLevel")


def test_observation_is_concise_and_instruction_has_mission():
    env = BabyAITextEnv("GoToLocal")
    obs = env.reset(1)
    assert obs.startswith("Facing ")
    assert env.mission in env.instruction and "move forward" in env.instruction
    lengths = [len(obs.split())]
    for action in ["turn left", "move forward", "turn right", "move forward", "pick up"]:
        obs, _, done, _ = env.step(action)
        lengths.append(len(obs.split()))
        if done:
            break
    assert max(lengths) <= 40 and sum(lengths) / len(lengths) <= 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("move forward", "move forward"),
        ("  Turn LEFT. ", "turn left"),
        ("I should go to the ball.\nmove forward", "move forward"),
        ("Thought: grab it. Action: pick up", "pick up"),
        ("pickup", "pick up"),
        ("fly", None),
        ("", None),
    ],
)
def test_normalize_action(text, expected):
    assert normalize_action(text) == expected


def test_invalid_action_gives_feedback_and_consumes_a_step():
    env = BabyAITextEnv("GoToRedBall", max_steps=3)
    first = env.reset(0)
    obs, reward, done, info = env.step("fly to the moon")
    assert "Invalid action" in obs and "turn left" in obs
    assert reward == 0.0 and not done and info == {**info, "success": False, "valid": False}
    assert info["steps"] == 1
    env.step("dance")
    obs, reward, done, info = env.step("sing")
    assert done and not info["success"] and info["truncated"] and reward == 0.0
    with pytest.raises(RuntimeError):
        env.step("turn left")
    assert env.reset(0) == first


def test_no_effect_is_reported():
    env = BabyAITextEnv("GoToRedBall")
    env.reset(0)
    for _ in range(10):  # walk into the wall ahead
        obs, _, done, _ = env.step("move forward")
        if done or obs.startswith("Nothing happens"):
            break
    assert done or obs.startswith("Nothing happens")


def _play(env: BabyAITextEnv, actions: list[str]) -> list[tuple]:
    out = []
    for a in actions:
        obs, r, done, info = env.step(a)
        out.append((obs, r, done, info["success"]))
        if done:
            break
    return out


def test_clone_is_exact_and_independent():
    env = BabyAITextEnv("GoToLocal")
    env.reset(5)
    _play(env, ["turn left", "move forward"])
    twin = env.clone()
    probe = ["move forward", "turn right", "move forward", "move forward", "turn left", "move forward"]
    a = _play(env, probe)
    # the original moved on; the clone is still at the branching state
    assert len(twin.history) == 2 and len(env.history) == 2 + len(a)
    b = _play(twin, probe)
    assert a == b
    again = env.clone()
    assert again.describe() == env.describe()
    again.step("turn left")
    assert again.describe() != env.describe()


def test_replay_matches_clone():
    env = BabyAITextEnv("PickupLoc")
    env.reset(11)
    _play(env, ["turn right", "move forward", "move forward", "turn left"])
    rebuilt = replay(lambda: BabyAITextEnv("PickupLoc"), 11, env.history)
    assert rebuilt.describe() == env.describe()
    assert _play(rebuilt, ["move forward", "turn left"]) == _play(env.clone(), ["move forward", "turn left"])


@pytest.mark.parametrize("level", ["GoToRedBall", "GoToLocal", "PickupLoc", "OpenDoor"])
def test_expert_solves_levels(level):
    env = BabyAITextEnv(level)
    policy = ScriptedBabyAIPolicy(error_rate=0.0, seed=0)
    wins = 0
    for seed in range(10):
        env.reset(seed)
        done = False
        while not done:
            _, reward, done, info = env.step(policy.propose(env, None, 1)[0])
        wins += info["success"]
        if info["success"]:
            assert 0.1 <= reward <= 1.0
    assert wins >= 9


def test_random_policy_mostly_fails():
    env = BabyAITextEnv("GoToRedBall", max_steps=24)
    policy = RandomPolicy(seed=0)
    wins = 0
    for seed in range(20):
        env.reset(seed)
        done = False
        while not done:
            _, _, done, info = env.step(policy.propose(env, None, 1)[0])
        wins += info["success"]
    assert wins <= 6


def test_rephrased_instructions_change_the_text_only():
    from agentrm.data.jobs import Job
    from agentrm.envs.babyai import REPHRASINGS, rephrase_mission
    from agentrm.envs.registry import make_env, parse_spec

    assert rephrase_mission("go to the red ball", 0) == "go to the red ball"
    assert rephrase_mission("go to the red ball", 1) == "navigate to the red ball"
    assert rephrase_mission("pick up a box", 2) == "pick up a crate"
    assert rephrase_mission("pick up the blue box", 3) == "grab the blue container"
    assert rephrase_mission("go to a ball", 4) == "your goal is to reach a ball"
    assert rephrase_mission("go to the keyboard", 2) == "go to the keyboard"  # whole words only
    texts, obs = [], []
    for v in range(len(REPHRASINGS) + 1):
        spec = parse_spec(f"babyai:GoToLocal?max_steps=12&rephrase={v}" if v else "babyai:GoToLocal?max_steps=12")
        env = make_env(spec)
        seed = Job(spec, 0).seeds(7)[0]  # the variants play the same episodes
        obs.append((env.reset(seed), env.step("turn left")[0]))
        texts.append(env.instruction)
        assert env.spec == spec
    assert len(set(texts)) == len(texts) and len(set(obs)) == 1
    with pytest.raises(ValueError, match="rephrase"):
        make_env(parse_spec("babyai:GoToLocal?rephrase=9"))
