"""bench/generalisation_report.py --join: another run's Best-of-N rows join the comparison on the same episodes
only, and runs that did not play the same episodes are refused."""

from __future__ import annotations

import json

import pytest

from bench.generalisation_report import by_family, join_rows, read_rows, unscored_table


def _row(method, episode, success, scorer=None, n=None):
    return {"method": method, "scorer": scorer, "n": n, "w": None, "k": None, "env": "babyai:OpenDoor",
            "env_set": "held_out", "episode": episode, "success": success}


def _run(path, rows):
    path.mkdir()
    (path / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_join_adds_other_scorers_on_the_same_episodes_only(tmp_path):
    judge = _run(tmp_path / "judge", [_row("greedy", e, e % 2 == 0) for e in range(2)]
                 + [_row("best_of_n", e, True, "judge", 5) for e in range(2)])
    rms = _run(tmp_path / "rms", [_row("greedy", e, e % 2 == 0) for e in range(4)]
               + [_row("best_of_n", e, False, "rm", 5) for e in range(4)]
               + [_row("best_of_n", e, False, "judge", 5) for e in range(4)])  # a method the main run has: not joined
    rows = join_rows(read_rows([judge]), [rms])
    added = [r for r in rows if r["scorer"] == "rm"]
    assert sorted(r["episode"] for r in added) == [0, 1]
    assert [r["success"] for r in rows if r["scorer"] == "judge"] == [True, True]
    other = _run(tmp_path / "other", [_row("greedy", 0, False), _row("best_of_n", 0, True, "rm", 5)])
    with pytest.raises(SystemExit, match="not the same episodes"):
        join_rows(read_rows([judge]), [other])


def test_unscored_table_gives_the_share_of_candidates_without_a_score():
    rows = [{**_row("best_of_n", e, True, "judge", 5), "candidates_scored": 5, "unscored": u} for e, u in enumerate([1, 4])]
    rows += [{**_row("best_of_n", e, True, "rm", 5), "candidates_scored": 5, "unscored": 0} for e in range(2)]
    rows += [{**_row("greedy", e, True), "candidates_scored": 0} for e in range(2)]
    table = unscored_table(by_family(rows))
    assert "| best_of_n[judge]@5 | 0.50 (5/10) | 0.50 (5/10) |" in table
    assert "| best_of_n[rm]@5 | 0.00 (0/10) | 0.00 (0/10) |" in table and "greedy" not in table
    assert unscored_table(by_family([r for r in rows if r["scorer"] != "judge"])) == ""
