"""The one-command pipeline with tiny budgets: every stage runs, a rerun skips finished stages."""

from __future__ import annotations

import json

import pytest

import agentrm.pipeline as pipeline
from agentrm.checks import ConfigError
from agentrm.pipeline import (
    EvalStage,
    ExpertStage,
    FitStage,
    PipelineConfig,
    PolicyChoice,
    TreeStage,
    run_pipeline,
)
from tests.lit.conftest import TINY_BACKBONE

FIT = {
    "trainer": {"max_epochs": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
    "model": {"init_args": {"backbone_config": TINY_BACKBONE, "warmup_steps": 2}},
    "data": {"max_length": 256, "val_fraction": 0.34, "allow_degenerate": True},  # tiny trees: few labels
}


def _run(tmp_path, **kw):
    return run_pipeline(PipelineConfig(
        run_dir=str(tmp_path / "run"),
        envs=["babyai:GoToRedBall?max_steps=8", "babyai:GoToObj?max_steps=8"],
        seed=0,
        expert=ExpertStage(episodes=3),
        sft=FitStage("configs/tiny/policy_sft.yaml", FIT),
        trees=kw.pop("trees", None) or TreeStage(episodes=1, simulations=3, k=2, max_depth=8, commit=False, min_visits=1),
        rm=kw.pop("rm", None) or FitStage("configs/tiny/value_rm.yaml", FIT),
        eval=kw.pop("eval", None) or EvalStage(episodes=1, best_of_n=[2], max_new_tokens=4),
        num_threads=1,
        progress=False,
        **kw,
    ))


def test_pipeline_runs_all_stages_then_skips_them(tmp_path, monkeypatch):
    s = _run(tmp_path)
    run = tmp_path / "run"
    for stage in pipeline.STAGES:
        assert (run / stage / "DONE").exists() and not s[stage].get("skipped")
    assert s["expert"]["episodes"] == 6
    assert (run / "sft" / "hf_model" / "config.json").exists()
    assert s["trees"]["trees"] == 2 and s["trees"]["simulations"] == 6 and s["trees"]["records"] >= 2
    assert (run / "rm" / "hf_model" / "value_head.safetensors").exists()
    methods = {r["method"] for r in s["eval"]["rows"]}
    assert {"greedy", "sampling", "best_of_n"} <= methods
    assert json.loads((run / "summary.json").read_text())["trees"]["trees"] == 2

    def boom(*a, **k):
        raise AssertionError("a finished stage was rerun")

    monkeypatch.setattr(pipeline, "_fit", boom)
    monkeypatch.setattr("agentrm.trees.build_trees", boom)
    monkeypatch.setattr("agentrm.collect.collect", boom)
    monkeypatch.setattr("agentrm.search.evaluate.evaluate", boom)
    again = _run(tmp_path)
    assert all(again[st]["skipped"] for st in pipeline.STAGES)

    # forcing a stage reruns it and everything after it, nothing before
    calls = []
    monkeypatch.setattr(
        pipeline,
        "_fit",
        lambda config, out: calls.append(out.name) or {"hf_model": str(out / "hf_model")},
    )
    monkeypatch.setattr("agentrm.search.evaluate.evaluate", lambda config: calls.append("eval") or [])
    forced = _run(tmp_path, force=["rm"])
    assert calls == ["rm", "eval"] and forced["trees"]["skipped"] and not forced["rm"].get("skipped")
    with pytest.raises(ConfigError, match="unknown stage"):
        _run(tmp_path, force=["nope"])


def test_pipeline_with_the_scripted_policy_skips_sft_and_reports_paired_differences(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no demonstrations are needed for the scripted policy")

    monkeypatch.setattr("agentrm.collect.collect", boom)
    s = _run(
        tmp_path,
        policy=PolicyChoice(kind="expert", error_rate=0.5),
        trees=TreeStage(episodes=2, simulations=3, k=2, max_depth=8, commit=True, min_visits=2),
    )
    assert "skipped" in s["expert"] and "skipped" in s["sft"]
    assert not (tmp_path / "run" / "sft" / "hf_model").exists()
    t = s["trees"]
    assert t["trees"] == 4 and t["simulations"] > 4 * 3  # a budget per committed step
    assert 0 < t["states_kept"] < t["states_visited"]
    comps = {(c["env_set"], c["method"], c["baseline"]) for c in s["eval"]["comparisons"]}
    assert ("held_in", "best_of_n[value_rm]@2", "greedy") in comps
    assert ("held_in", "best_of_n[value_rm]@2", "best_of_n[value_rm]@1") not in comps  # no N=1 run
    assert (tmp_path / "run" / "eval" / "comparisons.md").exists()


def test_every_stage_config_is_checked_before_the_first_stage(tmp_path, monkeypatch):
    """A typo in the RM stage's overrides (stage 4) fails in one line before stage 1 runs."""
    ran = []
    monkeypatch.setattr("agentrm.collect.collect", lambda config: ran.append("expert"))
    bad = FitStage("configs/tiny/value_rm.yaml", {**FIT, "model": {"init_args": {"learnig_rate": 1.0}}})
    with pytest.raises(ConfigError, match=r"rm \(configs/tiny/value_rm.yaml with rm.overrides\): .*'learnig_rate'"):
        _run(tmp_path, rm=bad)
    with pytest.raises(ConfigError, match=r"max_depth: must be >= 1"):
        _run(tmp_path, trees=TreeStage(episodes=1, simulations=3, k=2, max_depth=0))
    with pytest.raises(ConfigError, match=r"best_of_n\[0\]: must be >= 1"):
        _run(tmp_path, eval=EvalStage(episodes=1, best_of_n=[0, 2]))
    assert ran == [] and not list((tmp_path / "run").rglob("DONE"))
