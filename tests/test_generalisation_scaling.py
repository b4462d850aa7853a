"""bench/generalisation_scaling.py: type orders, resumable fits, the mean over type orders and its table."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import generalisation_scaling as scaling


def _row(fam: str, episode: int, method: str, success: float, scorer: str | None = None, n: int | None = None):
    return {"env_set": fam, "env": f"{fam}:x", "episode": episode, "method": method, "scorer": scorer, "n": n,
            "success": success}


def _rows():
    """BabyAI, 3 episodes: greedy 0,0,1; order 0's Best-of-5 1,0,1 (+1/3); order 1's 1,1,1 (+2/3); Best-of-1 =
    greedy."""
    rows = []
    for e, (g, a, b) in enumerate([(0, 1, 1), (0, 0, 1), (1, 1, 1)]):
        rows.append(_row("babyai", e, "greedy", g))
        for seed, bo5 in ((0, a), (1, b)):
            name = scaling.scorer_name(seed, 3)
            rows.append(_row("babyai", e, "best_of_n", g, name, 1))
            rows.append(_row("babyai", e, "best_of_n", bo5, name, 5))
    return rows


def test_type_orders_alternate_families_and_differ_by_seed():
    types = [f"babyai/b{i}" for i in range(4)] + [f"sciworld/s{i}" for i in range(3)] + ["textworld/custom"]
    a, b = scaling.type_order(types, 0), scaling.type_order(types, 1)
    assert sorted(a) == sorted(types) and a == scaling.type_order(types, 0)
    assert [t.split("/")[0] for t in a[:3]] == ["babyai", "sciworld", "textworld"]
    assert a != b


def test_mean_over_orders_averages_per_episode_then_bootstraps():
    rows = _rows()
    got = scaling.mean_over_orders(rows, 3, [0, 1], "babyai", "greedy")
    # per episode: mean of (1-0, 1-0)=1, (0-0, 1-0)=0.5, (1-1, 1-1)=0 -> mean 1/2
    assert got["episodes"] == 3 and got["difference"] == pytest.approx(1 / 2)
    assert got["ci_low"] <= got["difference"] <= got["ci_high"]
    assert scaling.mean_over_orders(rows, 3, [0, 1], "babyai", "bo1")["difference"] == pytest.approx(1 / 2)
    # an episode one order did not play is left out, not counted as half
    partial = [r for r in rows if not (r["episode"] == 2 and r.get("scorer") == scaling.scorer_name(1, 3))]
    assert scaling.mean_over_orders(partial, 3, [0, 1], "babyai", "greedy")["episodes"] == 2
    assert scaling.mean_over_orders(rows, 6, [0, 1], "babyai", "greedy") is None


def test_table_has_a_row_per_order_and_a_mean_row():
    from agentrm.search.compare import paired_comparisons

    rows = _rows()
    info = {(s, 3): {"types": ["a", "b", "c"], "states": 100 + s, "fit_wall_s": 1.0, "val_unseen/auroc": 0.4 + s / 10}
            for s in (0, 1)}
    text = scaling.table(info, paired_comparisons(rows), rows, [0, 1])
    lines = [ln for ln in text.splitlines() if ln.startswith("| 3 ") or ln.startswith("| **3**")]
    assert len(lines) == 3 and "**mean**" in lines[2] and "| 0.450 |" in lines[2]
    assert "+0.333 [" in lines[0] and "+0.667 [" in lines[1] and "**+0.500 [" in lines[2]


def test_fits_are_reused_only_for_the_same_set_and_budget(tmp_path, monkeypatch):
    calls = []

    def fake_fit(train, out, steps):
        calls.append(steps)
        (out / "hf_model").mkdir(parents=True)
        return {"val_unseen/auroc": 0.5}, 2.0

    monkeypatch.setattr(scaling, "fit", fake_fit)
    lines = [json.dumps({"task": "babyai/x", "id": "1"}) + "\n"]
    first = scaling.fit_once(tmp_path / "k01", lines, 10, 100)
    assert calls == [100] and first["types"] == ["babyai/x"] and first["val_unseen/auroc"] == 0.5
    assert scaling.fit_once(tmp_path / "k01", lines, 10, 100) == first and calls == [100]
    shutil.rmtree(tmp_path / "k01" / "rm")  # the fake fit makes its directory anew
    scaling.fit_once(tmp_path / "k01", lines, 10, 50)
    assert calls == [100, 50]  # another step budget: fitted again
    other = [json.dumps({"task": "babyai/y", "id": "2"}) + "\n"]
    shutil.rmtree(tmp_path / "k01" / "rm")
    scaling.fit_once(tmp_path / "k01", other, 10, 50)
    assert calls == [100, 50, 50]
