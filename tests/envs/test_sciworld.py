"""ScienceWorldTextEnv: specs, official splits, progress reward, JVM pool, clone by replay, gold-path expert.

These tests need Java (``scripts/setup.sh`` installs it); without it they fail with the
reason, they are never skipped.  One JVM pool serves the whole module (~300 MB per JVM).
"""

from __future__ import annotations

import pytest

from agentrm.envs import sciworld
from agentrm.envs.base import Env, replay
from agentrm.envs.registry import check_disjoint, make_env
from agentrm.envs.sciworld import (
    DEVIATION_EXCLUDED,
    SPLIT_SIZES,
    TASK_NAMES,
    GoldPathPolicy,
    ScienceWorldTextEnv,
    pool,
    resolve_task,
    variations,
)

SPEC = "sciworld:find-living-thing?max_steps=30"
SEED = 1  # train variation 1: art studio start, gold path of 12 actions


@pytest.fixture
def env():
    e = make_env(SPEC)
    yield e
    e.close()


# --------------------------------------------------------------------- specs (no JVM)
def test_spec_parsing_and_defaults():
    e = make_env("sciworld:boil")
    assert isinstance(e, Env) and isinstance(e, ScienceWorldTextEnv)
    assert (e.task, e.split, e.max_steps, e.simplification, e.teleport) == (
        "boil",
        "train",
        100,
        "easy",
        True,
    )
    e = make_env("sciworld:4-1@dev?max_steps=7&simplification=none")
    assert (e.task, e.split, e.max_steps, e.simplification, e.teleport) == (
        "find-living-thing",
        "dev",
        7,
        "",
        False,
    )
    e = make_env("sciworld:0@test?simplification=openDoors,teleportAction")
    assert (e.task, e.simplification, e.teleport) == ("boil", "openDoors,teleportAction", True)
    assert (
        str(ScienceWorldTextEnv("4-1", "dev", 7, "none").spec)
        == "sciworld:find-living-thing@dev?max_steps=7&simplification=none"
    )
    assert (
        e.canonical_action("Thought: hot.\nAction: Go to  Kitchen.") == "go to kitchen"
        and e.canonical_action(" ") is None
    )
    assert resolve_task(str(TASK_NAMES.index("melt"))) == "melt" and resolve_task("1-2") == "melt"
    assert len(TASK_NAMES) == 30 and set(TASK_NAMES) == set(SPLIT_SIZES)


def test_spec_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"sciworld:boil\?steps=3.*max_steps, simplification"):
        make_env("sciworld:boil?steps=3")
    with pytest.raises(ValueError, match="unknown ScienceWorld task 'boiling'.*find-living-thing"):
        make_env("sciworld:boiling")
    with pytest.raises(ValueError, match="simplification"):
        make_env("sciworld:boil?simplification=hard")
    with pytest.raises(ValueError, match="electrical"):
        make_env("sciworld:power-component?simplification=noElectricalAction")
    with pytest.raises(ValueError, match="split"):
        ScienceWorldTextEnv("boil", split="val")


def test_splits_never_share_variations():
    for task in ("boil", "find-living-thing", "identify-life-stages-2"):
        keys = {
            s: {make_env(f"sciworld:{task}@{s}").instance_key(seed) for seed in range(40)}
            for s in ("train", "dev", "test")
        }
        check_disjoint(keys["train"], keys["dev"])
        check_disjoint(keys["train"], keys["test"])
        check_disjoint(keys["dev"], keys["test"])
        with pytest.raises(ValueError, match="also training"):
            check_disjoint(keys["train"], keys["train"])
        n_train, n_dev, n_test = SPLIT_SIZES[task]
        assert len(keys["train"]) == min(40, n_train) and len(keys["test"]) == min(40, n_test)
    e = make_env("sciworld:boil@dev")
    assert (
        e.instance_key(0) == "sciworld:boil#var=14" == e.instance_key(7)
    )  # seed wraps modulo the split size


# ------------------------------------------------------------------------- with a JVM
def test_split_table_matches_the_simulator():
    p = pool()
    with p.lock:
        b, _ = p.acquire(None)
        for task in TASK_NAMES:
            b.server.load(task, 0, "", False)
            assert list(b.server.getVariationsTrain()) == variations(task, "train"), task
            assert list(b.server.getVariationsDev()) == variations(task, "dev"), task
            assert list(b.server.getVariationsTest()) == variations(task, "test"), task


def test_gold_path_gives_rising_progress_and_success(env):
    obs = env.reset(SEED)
    assert "called the art studio" in obs and env.location == "art studio"
    assert "find a(n) living thing" in env.instruction and "focus on OBJ" in env.instruction
    gold = env.gold_path()
    rewards = []
    for i, action in enumerate(gold):
        obs, reward, done, info = env.step(action)
        rewards.append(reward)
        assert done == (i == len(gold) - 1) and info["success"] == done and info["valid"]
    assert (
        rewards == sorted(rewards) and 0.0 < rewards[0] < 1.0 and rewards[-1] == 1.0 and info["score"] == 100
    )
    with pytest.raises(RuntimeError, match="over"):
        env.step("look around")


def test_unparseable_action_reward_and_step_limit():
    e = make_env("sciworld:find-living-thing?max_steps=3")
    try:
        e.reset(SEED)
        _, r1, _, _ = e.step("open door to hallway")
        assert r1 > 0
        obs, r2, done, info = e.step("xyzzy frobnicate")
        assert obs == sciworld.UNPARSEABLE and r2 == 0.0 and not done
        assert info["valid"] is False and info["progress"] == r1
        obs, r3, done, info = e.step("")  # empty input counts as a step too
        assert done and info["truncated"] and not info["success"]
        assert r3 == r1  # the final step's reward is the episode's progress
    finally:
        e.close()


def test_wrong_focus_fails_with_zero_reward(env):
    env.reset(SEED)
    env.step("open door to hallway")
    obs, reward, done, info = env.step("focus on table")
    assert done and info["failed"] and not info["success"] and reward == 0.0 and info["score"] < 0


def test_clones_share_the_jvm_pool_and_replay_exactly(env):
    env.reset(SEED)
    gold = env.gold_path()
    for action in gold[:4]:
        env.step(action)
    p = pool()
    clones = [env.clone() for _ in range(6)]
    results = [c.step(gold[4]) for c in clones]  # each restores by replay where no JVM holds its state
    assert len(p.backends) <= p.max_backends
    assert all(r[:3] == results[0][:3] for r in results)
    started = p.stats["started"]
    more = [c.clone() for c in clones for _ in range(2)]
    looks = [c.step("look around")[0] for c in more]
    assert len(set(looks)) == 1 and "called the kitchen" in looks[0]
    assert p.stats["started"] == started  # no JVM per clone
    # the original was not moved by its clones, and equals a fresh replay of its actions
    original = env.step(gold[4])
    assert original[:3] == results[0][:3]
    rebuilt = replay(lambda: make_env(SPEC), SEED, gold[:5])
    assert rebuilt.step(gold[5])[:3] == env.step(gold[5])[:3]
    for c in [*clones, *more, rebuilt]:
        c.close()
        c.close()  # idempotent
        assert c.closed
    with pytest.raises(RuntimeError, match="closed"):
        clones[0].step("look around")


def test_valid_actions_on_demand(env):
    env.reset(SEED)
    actions = env.valid_actions
    assert {"go to hallway", "teleport to kitchen", "focus on table", "look around"} <= set(actions)
    assert actions == sorted(set(actions))


def test_expert_is_deterministic_and_recovers_from_a_move():
    a, b = make_env(SPEC), make_env(SPEC)
    try:
        runs = []
        for e in (a, b):
            e.reset(SEED)
            expert = e.expert_policy(0.3, seed=5)
            taken = []
            while True:
                action = expert.propose(e, None, 1)[0]
                taken.append(action)
                if e.step(action)[2]:
                    break
            runs.append(taken)
        assert runs[0] == runs[1]
        # a deviation to another room: the expert goes back where the gold path expects it
        a.reset(SEED)
        gold = a.gold_path()
        a.step(gold[0])
        assert "teleport" in a.step("teleport to kitchen")[0] and a.location == "kitchen"
        expert = GoldPathPolicy(0.0)
        assert expert.propose(a, None, 1) == ["teleport to art studio"]
        a.step("teleport to art studio")
        assert expert.propose(a, None, 2) == [gold[1], gold[1]]
    finally:
        a.close()
        b.close()


def test_expert_error_rate_samples_other_actions(env):
    env.reset(SEED)
    gold = env.gold_path()
    assert GoldPathPolicy(0.0).propose(env, None, 5) == [gold[0]] * 5
    wrong = GoldPathPolicy(1.0, seed=3).propose(env, None, 30)
    assert gold[0] not in wrong and not any(w.startswith(DEVIATION_EXCLUDED) for w in wrong)
    assert len(set(wrong)) > 10
    half = GoldPathPolicy(0.5, seed=3).propose(env, None, 200)
    assert 60 < half.count(gold[0]) < 140
    with pytest.raises(ValueError):
        GoldPathPolicy(1.5)


def test_pool_is_per_process_and_shuts_down(monkeypatch, env):
    p = pool()
    monkeypatch.setattr(sciworld, "_POOL", p)  # restored after the test
    monkeypatch.setattr(sciworld.os, "getpid", lambda: p.pid + 1)  # as in a forked child
    assert pool() is not p and pool().backends == []
    monkeypatch.undo()
    assert pool() is p
    env.reset(SEED)
    first = env.step("go to hallway")
    procs = [b.proc for b in p.backends]
    sciworld.shutdown_pool()
    assert p.backends == [] and all(proc.poll() is not None for proc in procs)
    clone = env.clone()  # envs outlive a shutdown: they restore on a new JVM when used
    assert clone.step("look around")[0] == env.step("look around")[0] and "hallway" in first[0]
    clone.close()


def test_missing_java_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(sciworld.shutil, "which", lambda name: None)
    monkeypatch.setenv("JAVA_HOME", "/nonexistent")
    with pytest.raises(RuntimeError, match="needs a Java runtime.*openjdk-17-jre-headless"):
        sciworld._Backend()
