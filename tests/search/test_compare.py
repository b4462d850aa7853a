"""Paired comparisons: differences are per episode, intervals are bootstrap and deterministic."""

import random

import pytest

from agentrm.search.compare import bootstrap_ci, comparisons_markdown, paired_comparisons


def _rows(method, scorer, n, successes, env_set="held_out", env="babyai:GoToLocal"):
    return [
        {"method": method, "scorer": scorer, "n": n, "w": None, "k": None, "env_set": env_set, "env": env,
         "episode": i, "success": s}
        for i, s in enumerate(successes)
    ]


def test_difference_is_paired_by_episode():
    rng = random.Random(3)
    greedy = [float(rng.random() < 0.5) for _ in range(200)]
    better = [1.0 if g else float(rng.random() < 0.5) for g in greedy]  # never worse, often better
    rows = _rows("greedy", None, None, greedy) + _rows("best_of_n", "rm", 5, better) + _rows("best_of_n", "rm", 1, greedy)
    rng.shuffle(rows)  # order must not matter
    comps = {(c["method"], c["baseline"]): c for c in paired_comparisons(rows)}
    c = comps[("best_of_n[rm]@5", "greedy")]
    assert c["episodes"] == 200 and c["losses"] == 0
    assert c["difference"] == pytest.approx(sum(better) / 200 - sum(greedy) / 200)
    assert 0 < c["ci_low"] <= c["difference"] <= c["ci_high"]
    assert ("best_of_n[rm]@5", "best_of_n[rm]@1") in comps
    same = comps[("best_of_n[rm]@1", "greedy")]
    assert same["difference"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    assert "best_of_n[rm]@5" in comparisons_markdown(list(comps.values()))


def test_interval_covers_zero_for_a_coin_flip_and_is_deterministic():
    rng = random.Random(0)
    a = [float(rng.random() < 0.5) for _ in range(100)]
    b = a[50:] + a[:50]  # same success rate, other episodes: mean difference exactly 0
    rows = _rows("greedy", None, None, a) + _rows("beam", "rm", None, b)
    rows = [{**r, "w": 2, "k": 4} if r["method"] == "beam" else r for r in rows]
    (c,) = paired_comparisons(rows)
    assert c["method"] == "beam[rm]W2K4" and c["ci_low"] < 0 < c["ci_high"]
    assert paired_comparisons(rows) == [c]
    lo, hi = bootstrap_ci([d for d in (x - y for x, y in zip(a, b))], seed=1)
    assert lo < hi


def test_episodes_are_matched_within_an_env_set_only():
    rows = _rows("greedy", None, None, [0.0] * 10, env_set="held_in") + _rows("best_of_n", "rm", 4, [1.0] * 10)
    assert paired_comparisons(rows) == []


def test_a_reference_scorer_is_compared_on_the_same_method_and_episodes():
    greedy = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    tiny = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    big = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    rows = (_rows("greedy", None, None, greedy) + _rows("best_of_n", "tiny", 5, tiny)
            + _rows("best_of_n", "big", 5, big) + _rows("best_of_n", "big", 1, greedy)
            + _rows("best_of_n", "tiny", 1, greedy)
            + [{**r, "w": 5, "k": 5, "n": None} for r in _rows("beam", "big", None, big) + _rows("beam", "tiny", None, tiny)])
    without = {(c["method"], c["baseline"]) for c in paired_comparisons(rows)}
    comps = {(c["method"], c["baseline"]): c for c in paired_comparisons(rows, reference_scorer="tiny")}
    added = set(comps) - without
    assert added == {("best_of_n[big]@5", "best_of_n[tiny]@5"), ("beam[big]W5K5", "beam[tiny]W5K5")}
    c = comps[("best_of_n[big]@5", "best_of_n[tiny]@5")]
    assert (c["episodes"], c["wins"], c["losses"]) == (6, 2, 1)
    assert c["difference"] == pytest.approx((4 - 3) / 6)
