"""Scorers default to what the exported RM records (max_length, aggregate); the spec overrides, with a warning
when an override truncates more than training did; old exports fall back to a stated budget."""

from __future__ import annotations

import warnings

import pytest
import torch

from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import load_tokenizer
from agentrm.search.build import build_scorer
from agentrm.search.resolve import FALLBACK_MAX_LENGTH
from agentrm.search.specs import ScorerSpec
from tests.lit.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    rm = ValueRewardModel(build_backbone(config=TINY_BACKBONE, vocab_size=len(tok)))
    prm = ImplicitPRM(build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), causal_lm=True))
    return {
        "old_rm": rm.save_pretrained(root / "old_rm", tokenizer=tok),  # written before max_length was recorded
        "prm": prm.save_pretrained(root / "prm", tokenizer=tok, aggregate="mean", max_length=200),
    }


def test_recorded_settings_are_the_defaults(exports):
    prm = build_scorer(ScorerSpec(kind="implicit_prm", path=str(exports["prm"])))
    assert (prm.max_length, prm.aggregate) == (200, "mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a longer budget than training is not warned about
        longer = build_scorer(ScorerSpec(kind="implicit_prm", path=str(exports["prm"]), max_length=400, aggregate="min"))
    assert (longer.max_length, longer.aggregate) == (400, "min")
    with pytest.warns(UserWarning, match="max_length=100 is below the 200 tokens"):
        build_scorer(ScorerSpec(kind="implicit_prm", path=str(exports["prm"]), max_length=100))


def test_an_export_without_a_record_uses_the_stated_fallback(exports):
    rm = build_scorer(ScorerSpec(path=str(exports["old_rm"])))
    assert (rm.max_length, rm.aggregate) == (FALLBACK_MAX_LENGTH, "last")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    root = tmp_path_factory.mktemp("judge")
    torch.manual_seed(0)
    build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), causal_lm=True).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


@pytest.mark.parametrize("samples,temperature,expected", [(1, None, 0.0), (3, None, 1.0), (1, 0.7, 0.7)])
def test_a_single_sample_judge_decodes_greedily_by_default(judge_dir, samples, temperature, expected):
    """One sampled reply is a noisy rating: a single-sample judge decodes greedily unless told otherwise."""
    judge = build_scorer(ScorerSpec(kind="judge", judge_model=judge_dir, judge_samples=samples,
                                    judge_temperature=temperature, judge_max_tokens=4))
    assert judge.temperature == expected
    if expected == 0.0:  # the same prompt gets the same reply whatever was asked before
        messages = [{"role": "user", "content": "Go to the ball. You see the ball. Rating?"}]
        first = judge.client.chat(messages, n=1, temperature=judge.temperature)
        judge.client.chat([{"role": "user", "content": "Something else."}], n=1, temperature=judge.temperature)
        assert judge.client.chat(messages, n=1, temperature=judge.temperature) == first
