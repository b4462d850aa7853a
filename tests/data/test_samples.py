"""The shipped samples: valid records with Monte-Carlo values from each family, train instances only,
and a tokenizer that covers all three families' text."""

from __future__ import annotations

import pytest

from agentrm.data.schema import read_jsonl
from agentrm.paths import load_tokenizer, resolve_path

SAMPLES = {
    "babyai": "agentrm/assets/babyai_sample.jsonl",
    "sciworld": "agentrm/assets/sciworld_sample.jsonl",
    "textworld": "agentrm/assets/textworld_sample.jsonl",
}


@pytest.mark.parametrize("family", list(SAMPLES))
def test_sample_records_carry_values_and_both_outcomes(family):
    trajs = read_jsonl(resolve_path(SAMPLES[family]))
    assert all(t.task.startswith(f"{family}/") for t in trajs)
    mains = [t for t in trajs if "branch_at" not in t.meta]
    assert {t.success for t in mains} == {True, False}  # both outcomes, so AUROC is defined
    valued = [s.value for t in trajs for s in t.steps if s.value is not None]
    assert len(valued) > 5 * len(mains) and all(0.0 <= v <= 1.0 for v in valued)


@pytest.mark.parametrize("family", ["sciworld", "textworld"])
def test_samples_use_training_instances_only(family):
    """ScienceWorld train variations / TextWorld train games: never an evaluation (test) instance."""
    from agentrm.envs.registry import make_env, parse_spec

    trajs = [t for t in read_jsonl(resolve_path(SAMPLES[family])) if "branch_at" not in t.meta]
    specs = {t.meta["env"] for t in trajs}
    for spec in map(parse_spec, specs):
        assert spec.split == "train"
        env = make_env(spec.with_split("test"))
        try:
            test_keys = {env.instance_key(s) for s in range(500)}
        finally:
            env.close()
        assert not test_keys & {t.meta["instance"] for t in trajs if t.meta["env"] == str(spec)}


def test_multi_tokenizer_covers_every_family():
    multi, tiny = load_tokenizer("agentrm/assets/multi_tokenizer"), load_tokenizer("agentrm/assets/tiny_tokenizer")
    for family, path in SAMPLES.items():
        text = " ".join(s.observation for t in read_jsonl(resolve_path(path))[:20] for s in t.steps)
        ids = multi(text, add_special_tokens=False)["input_ids"]
        assert multi.decode(ids) == text
        if family != "babyai":  # trained on these texts: far fewer tokens than the BabyAI-only tokenizer
            assert len(ids) < 0.8 * len(tiny(text, add_special_tokens=False)["input_ids"]), family
