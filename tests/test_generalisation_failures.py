"""bench/generalisation_failures.py: how picked trajectories fail, per family and method."""

from __future__ import annotations

import json

from bench import generalisation_failures as failures


def _row(env, episode, method, success, actions, scorer=None, n=None):
    return {"env": env, "episode": episode, "method": method, "scorer": scorer, "n": n, "success": success,
            "actions": actions}


def test_failures_are_split_by_how_they_ended(tmp_path, monkeypatch):
    monkeypatch.setattr(failures, "step_limit", lambda spec: 4)
    game = "textworld:cooking@test"
    rows = [
        _row(game, 0, "greedy", 1.0, ["take knife", "slice apple", "eat meal"]),
        _row(game, 1, "greedy", 0.0, ["go north", "go south", "go north", "go south"]),  # cut at the limit
        _row(game, 0, "best_of_n", 0.0, ["take apple", "cook apple with stove"], "rm", 5),  # lost early
        _row(game, 1, "best_of_n", 0.0, ["eat apple"], "rm", 5),
        _row(game, 0, "best_of_n", 1.0, ["take knife", "slice apple", "eat meal"], "rm", 1),  # Best-of-1: left out
        _row(game, 0, "sampling", 0.4, None, None, 5),
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = failures.failure_rows(rows)
    assert [s["method"] for s in summary] == ["greedy", "best_of_n[rm]@5"]
    greedy, picked = summary
    assert greedy["success"] == 0.5 and greedy["failures"] == 1 and greedy["failures_early"] == 0
    assert greedy["steps_success"] == 3 and greedy["steps_failure"] == 4
    assert picked["success"] == 0.0 and picked["failures_early"] == 2 and picked["steps_success"] is None
    assert dict(picked["last_actions"]) == {"cook": 1, "eat": 1}
    text = failures.main([str(tmp_path / "run"), "--md", str(tmp_path / "f.md")])
    assert "| textworld | best_of_n[rm]@5 | 2 | 0.000 | – / 1.5 | 2 of 2 | cook 1, eat 1 |" in text
    assert (tmp_path / "f.md").read_text() == text


def test_step_limit_reads_the_spec_and_the_family_default():
    assert failures.step_limit("babyai:OpenDoor?max_steps=24") == 24
