"""TextWorld family (:mod:`agentrm.envs.textworld`): specs, generation cache, play, clone, close, expert.

Games are generated once per module into a temporary cache (~2-3 s each on 2 cores) and
shared by the tests; the spec-only tests generate nothing.
"""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("textworld", reason="the textworld package is needed (pip install textworld)")

from agentrm.envs.base import replay  # noqa: E402
from agentrm.envs.registry import check_disjoint, make_env, parse_spec  # noqa: E402
from agentrm.envs.textworld import (  # noqa: E402
    TextWorldEnv,
    clean_feedback,
    ensure_game,
    game_fingerprint,
    make,
    normalize_command,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("twcache")


@pytest.fixture(scope="module")
def spec(cache) -> str:
    return f"textworld:cooking?games=2&cache_dir={cache}"


@pytest.fixture
def env(spec):
    env = make_env(spec)
    yield env
    env.close()


def _frotz_maps() -> int:
    """Number of memory mappings of jericho's per-instance copies of libfrotz (0 when not on Linux)."""
    try:
        return sum("libfrotz" in line for line in Path("/proc/self/maps").read_text().splitlines())
    except OSError:
        return 0


# ------------------------------------------------------------------------ specs (no games)
def test_spec_options_defaults_and_errors():
    env = make(parse_spec("textworld:cooking@test?games=3&open=false&go=1"))
    assert env.games == 3 and env.max_steps == 50 and env.options["open"] is False and env.options["go"] == 1
    assert env.settings["split"] == "test"  # foods=split: tw-cooking's unseen test foods
    assert make(parse_spec("textworld:cooking@dev?foods=all")).settings["split"] is None
    assert make(parse_spec("textworld:custom?quest_length=3")).settings == {
        "world_size": 5, "nb_objects": 10, "quest_length": 3}
    with pytest.raises(ValueError, match=r"textworld:cooking\?bogus=1.*bogus.*allowed.*recipe"):
        make_env("textworld:cooking?bogus=1")
    with pytest.raises(ValueError, match="world_size"):  # a custom option on a cooking spec
        make_env("textworld:cooking?world_size=3")
    with pytest.raises(ValueError, match="kind 'maze'.*cooking, custom"):
        make_env("textworld:maze")
    for bad in ("go=5", "open=maybe", "games=0", "take=3", "max_steps=x", "foods=some"):
        with pytest.raises(ValueError, match="textworld:cooking"):
            make_env(f"textworld:cooking?{bad}")


def test_instance_keys_are_disjoint_across_splits():
    keys = {s: [make_env(f"textworld:cooking@{s}?games=50").instance_key(i) for i in range(200)]
            for s in ("train", "dev", "test")}
    assert len(set(keys["train"])) == 50  # reset(seed) plays game seed % games
    assert keys["train"][3] == keys["train"][53] == "textworld:cooking#game=3&gen=" + keys["train"][3].split("gen=")[1]
    check_disjoint(keys["train"], keys["test"])
    check_disjoint(keys["train"], keys["dev"])
    with pytest.raises(ValueError, match="also training"):
        check_disjoint(keys["train"], [make_env("textworld:cooking?games=8").instance_key(1)])
    # other generation options are other games; games/max_steps are not part of the game
    assert make_env("textworld:cooking?go=1").instance_key(1) != make_env("textworld:cooking").instance_key(1)
    assert make_env("textworld:cooking?max_steps=9").instance_key(1) == make_env("textworld:cooking").instance_key(1)
    assert make_env("textworld:custom").instance_key(1).startswith("textworld:custom#game=1&")


def test_clean_feedback_strips_banner_status_and_prompt():
    raw = ("\n\n  ________  ________\n |        \\|   $$$$\\\n \\$$$$$$$$| $$\n\nYou are hungry!\n\n"
           "-= Kitchen =-\nYou see a   knife.\n\n>          -= Kitchen =-0/1")
    assert clean_feedback(raw) == "You are hungry!\n\n-= Kitchen =-\nYou see a   knife."
    end = "You eat.\n\n   *** The End ***\n\nWould you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n>  -= K =-5/9"
    assert clean_feedback(end) == "You eat.\n\n*** The End ***"


def test_normalize_command_keeps_one_command():
    assert normalize_command("I should cook.\nAction: Take the Knife. eat knife") == "Take the Knife"
    assert normalize_command("  `go north`  ") == "go north"
    assert normalize_command("open fridge then take milk") == "open fridge"
    assert normalize_command("take type 0 key.") == "take type 0 key"


# --------------------------------------------------------------------------- generation
def test_generation_is_cached_and_deterministic(spec, cache, tmp_path):
    env = make_env(spec)
    env.reset(0)
    path = env.game_path
    meta_mtime = (path.parent / "meta.json").stat().st_mtime_ns
    t = time.perf_counter()
    assert ensure_game(env.kind, env.settings, env.game_seed(0), cache) == path  # cache hit
    assert time.perf_counter() - t < 0.5 and (path.parent / "meta.json").stat().st_mtime_ns == meta_mtime
    again = ensure_game(env.kind, env.settings, env.game_seed(0), tmp_path)  # regenerate elsewhere
    assert again != path and game_fingerprint(again.parent) == game_fingerprint(path.parent)
    assert env.walkthrough and (again.parent / "meta.json").read_text().count(env.walkthrough[-1]) >= 1
    env.reset(1)
    assert game_fingerprint(env.game_path.parent) != game_fingerprint(path.parent)
    env.close()


def test_concurrent_generation_makes_one_game(tmp_path):
    settings = make_env("textworld:custom?quest_length=2").settings
    out, errors = [], []

    def work():
        try:
            out.append(ensure_game("custom", settings, 7, tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(set(out)) == 1 and out[0].is_file()
    group = out[0].parent.parent
    assert sorted(p.name for p in group.iterdir() if p.is_dir()) == ["g7"]  # no temporary folder left


@pytest.mark.slow
def test_two_processes_generating_the_same_game_agree(tmp_path):
    code = ("import sys; from agentrm.envs.textworld import ensure_game; "
            "print(ensure_game('custom', {'world_size': 3, 'nb_objects': 5, 'quest_length': 3}, 11, sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    game = Path(paths.pop())
    assert json.loads((game.parent / "meta.json").read_text())["fingerprint"] == game_fingerprint(game.parent)


# ------------------------------------------------------------------------------- playing
@pytest.mark.parametrize("kind", ["cooking", "custom"])
def test_walkthrough_wins_with_progress_rewards(kind, spec, cache):
    env = make_env(spec if kind == "cooking" else f"textworld:custom?games=2&cache_dir={cache}")
    try:
        first = env.reset(1)
        assert "$$" not in first and "=-0/" not in first and first.strip()
        assert env.instruction.startswith(first.split("\n")[0][:20]) and "go <north" in env.instruction
        assert "look" in env.valid_actions
        rewards = []
        for action in env.walkthrough:
            obs, reward, done, info = env.step(action)
            rewards.append(reward)
            assert info["admissible"] and not info["lost"]
        assert done and info["success"] and info["won"] and rewards[-1] == 1.0
        assert rewards == sorted(rewards) and all(0.0 <= r <= 1.0 for r in rewards)
        with pytest.raises(RuntimeError, match="over"):
            env.step("look")
    finally:
        env.close()


def test_garbage_meta_commands_and_step_limit(cache):
    env = make_env(f"textworld:cooking?games=2&max_steps=4&cache_dir={cache}")
    try:
        env.reset(0)
        before = env.valid_actions
        obs, reward, done, info = env.step("xyzzy frobnicate the quux")
        assert obs and reward == 0.0 and not done and not info["admissible"] and not info["success"]
        for meta in ("restart", "Undo", "tw-trace-actions"):
            obs, reward, done, info = env.step(meta)
            assert "not available" in obs
        assert done and info["truncated"] and not info["success"] and env.valid_actions == before
    finally:
        env.close()


def test_a_lost_game_ends_with_reward_zero(env):
    env.reset(1)
    cook = next(a for a in env.walkthrough if a.startswith("cook "))
    for action in env.walkthrough[: env.walkthrough.index(cook) + 1]:
        _, reward, *_ = env.step(action)
    assert reward > 0
    obs, reward, done, info = env.step(cook)  # cooking it twice burns it
    assert done and info["lost"] and not info["success"] and reward == 0.0 and "lost" in obs


def test_clone_is_exact_and_independent(env):
    env.reset(0)
    rng = random.Random(3)
    for action in env.walkthrough[:3]:
        env.step(action)
    clone = env.clone()
    assert clone.clone_mode == "copy" and clone.history == env.history and clone.valid_actions == env.valid_actions
    snapshot = (env.valid_actions, env.expert_action())
    clone.step(env.walkthrough[3])
    clone.step("xyzzy")
    assert (env.valid_actions, env.expert_action()) == snapshot  # the clone's steps did not move env
    twin, rebuilt = env.clone(), replay(lambda: make_env(env.spec), 0, env.history)
    try:
        for _ in range(12):  # random admissible (and some invalid) actions: copy == replay
            action = rng.choice(twin.valid_actions + ["eat the table"])
            a, b = twin.step(action), rebuilt.step(action)
            assert a == b and twin.valid_actions == rebuilt.valid_actions
            assert twin.expert_action() == rebuilt.expert_action()
            if a[2]:
                break
    finally:
        for e in (clone, twin, rebuilt):
            e.close()


def test_close_releases_the_game_and_is_idempotent(env):
    gc.collect()
    base = _frotz_maps()
    env.reset(0)
    clones = [env.clone() for _ in range(3)]
    assert _frotz_maps() > base or base == 0
    for c in clones:
        c.close()
        c.close()
        assert c.closed
    env.close()
    gc.collect()
    assert _frotz_maps() <= base
    assert env.closed and env.valid_actions == []
    with pytest.raises(RuntimeError):
        env.clone()
    with pytest.raises(RuntimeError):
        env.reset(0)


# -------------------------------------------------------------------------------- expert
def _expert_run(env, error_rate: float, seed: int) -> tuple[list[str], bool]:
    env.reset(1)
    expert = env.expert_policy(error_rate, seed=seed)
    actions = []
    while not env.done:
        actions.append(expert.propose(env, None, 1)[0])
        *_, info = env.step(actions[-1])
    return actions, info["success"]


def test_expert_is_deterministic_and_recovers(env):
    clean, ok = _expert_run(env, 0.0, 0)
    assert ok and len(clean) <= len(env.walkthrough)
    noisy, _ = _expert_run(env, 0.3, seed=5)
    assert noisy == _expert_run(env, 0.3, seed=5)[0] and noisy != clean
    env.reset(1)
    samples = env.expert_policy(1.0, seed=0).propose(env, None, 8)
    assert env.expert_action() not in samples and set(samples) <= set(env.valid_actions)
    with pytest.raises(ValueError):
        env.expert_policy(1.5)
    # after a deviation the planner replans from the new state and still wins
    env.reset(1)
    env.step(next(a for a in env.valid_actions if a.startswith("examine")))
    expert = env.expert_policy(0.0)
    while not env.done:
        *_, info = env.step(expert.propose(env)[0])
    assert info["success"]


def test_direct_construction_matches_spec(cache):
    env = TextWorldEnv("custom", "dev", {"games": 2, "cache_dir": str(cache)})
    assert str(env.spec).startswith("textworld:custom@dev") and env.game_seed(3) == 100_001
    env.close()
