"""Scorer and policy specs: loading options and model reachability are checked before anything is built."""

from __future__ import annotations

import json

import pytest
import torch

from agentrm.cli_errors import BuildError
from agentrm.models.backbone import build_backbone
from agentrm.models.quant import QuantizationUnavailable
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import ModelUnreachable, load_tokenizer
from agentrm.search import evaluate as evaluate_mod
from agentrm.search.build import build_scorer
from agentrm.search.resolve import resolve_policy, resolve_scorer
from agentrm.search.specs import PolicySpec, ScorerSpec
from tests.lit.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    torch.manual_seed(0)
    return ValueRewardModel(build_backbone(config=TINY_BACKBONE, vocab_size=len(tok))).save_pretrained(
        tmp_path_factory.mktemp("rm") / "hf_model", tokenizer=tok)


def test_scorer_built_with_dtype_and_device(rm_dir):
    scorer = build_scorer(ScorerSpec(path=str(rm_dir), device="cpu", dtype="bfloat16", attn_implementation="eager"))
    p = next(scorer.model.backbone.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu"
    assert scorer.model.backbone.config._attn_implementation == "eager"


def test_options_on_kinds_that_load_nothing_are_refused():
    with pytest.raises(ValueError, match="policy: quantization applies to a locally loaded model; kind 'openai'"):
        resolve_policy(PolicySpec(kind="openai", model="m", base_url="http://x", quantization="nf4"))
    with pytest.raises(ValueError, match=r"scorers\[2\]: device applies"):
        resolve_scorer(ScorerSpec(kind="oracle", device="cpu"), "scorers[2]")
    assert resolve_policy(PolicySpec(kind="expert")).placement is None


def test_quantized_scorer_and_policy_are_placed_or_refused_before_loading(rm_dir):
    """nf4/int8 run on CUDA or the CPU (bitsandbytes); another device fails at once, naming the section."""
    with pytest.raises(QuantizationUnavailable, match=r"scorers\[0\]: quantization='nf4' runs on a CUDA GPU or the CPU"):
        resolve_scorer(ScorerSpec(path=str(rm_dir), quantization="nf4", device="mps"), "scorers[0]")
    with pytest.raises(QuantizationUnavailable, match="policy: quantization='int8'"):
        resolve_policy(PolicySpec(kind="hf", model="smollm2-135m-instruct", quantization="int8", device="mps"))
    placement = resolve_scorer(ScorerSpec(path=str(rm_dir), quantization="nf4", device="cpu"), "scorers[0]").placement
    assert placement.device.type == "cpu" and placement.quantization == "nf4"


def test_reward_model_directory_is_checked(rm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"s\.path: not found"):
        resolve_scorer(ScorerSpec(path=str(tmp_path / "none")), "s")
    with pytest.raises(FileNotFoundError, match="agentrm_config.json missing"):
        resolve_scorer(ScorerSpec(path=str(tmp_path)), "s")
    with pytest.raises(ValueError, match="holds a 'ValueRewardModel', kind 'implicit_prm' needs a 'ImplicitPRM'"):
        resolve_scorer(ScorerSpec(kind="implicit_prm", path=str(rm_dir)), "s")
    with pytest.raises(ModelUnreachable, match=r"policy\.model 'runs/none/hf_model'"):
        resolve_policy(PolicySpec(kind="hf", model="runs/none/hf_model"))
    with pytest.raises(ModelUnreachable, match=r"s\.judge_model"):
        resolve_scorer(ScorerSpec(kind="judge", judge_model=str(tmp_path / "judge")), "s")


def test_lora_directory_base_is_checked_offline(tmp_path, monkeypatch):
    """An exported LoRA RM records its base; an unreachable base fails at once, ``base:`` points elsewhere."""
    d = tmp_path / "lora_rm"
    d.mkdir()
    (d / "agentrm_config.json").write_text(json.dumps({"model_class": "ValueRewardModel", "adapter": True,
                                                       "base_model": "agentrm-tests/uncached-8b"}))
    (d / "adapter_config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnreachable, match=r"rm: the LoRA base model 'agentrm-tests/uncached-8b'.*HF_HUB_OFFLINE"):
        resolve_scorer(ScorerSpec(path=str(d), device="cpu"), "rm")
    assert resolve_scorer(ScorerSpec(path=str(d), device="cpu", base="agentrm/assets/tiny_tokenizer"), "rm").placement


def test_evaluate_checks_every_model_before_building_environments(tmp_path, monkeypatch, rm_dir):
    built = []
    monkeypatch.setattr(evaluate_mod, "make_env", lambda spec: built.append(spec))
    with pytest.raises(BuildError, match=r"^scorers\[1\]\.path: not found"):
        evaluate_mod.evaluate(evaluate_mod.EvalConfig(
            out_dir=str(tmp_path), held_in=["babyai:GoToRedBall?max_steps=24"], episodes=1,
            scorers=[ScorerSpec(path=str(rm_dir)), ScorerSpec(path=str(tmp_path / "x"), name="b")],
            show=False, progress=False))
    assert built == []


def test_tree_builder_checks_its_policy_options_first(tmp_path):
    from agentrm.trees import TreesConfig, build_trees

    def trees(**policy):
        return build_trees(TreesConfig(out=str(tmp_path / "t.jsonl"), policy=PolicySpec(**policy), progress=False))

    with pytest.raises(BuildError, match=r"policy\.dtype: unknown dtype"):
        trees(kind="hf", model=str(tmp_path), dtype="half-ish")
    with pytest.raises(BuildError, match=r"policy\.model '.*sft': no such file"):
        trees(kind="hf", model=str(tmp_path / "sft"), device="cpu")
    with pytest.raises(ValueError, match="device applies to a locally loaded model; kind 'expert'"):
        trees(kind="expert", device="cpu")
    assert not (tmp_path / "t.jsonl").exists()


def test_hf_policy_loader_places_the_lm(tmp_path):
    from agentrm.policies.hf import load_hf_policy

    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    model = build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), causal_lm=True)
    model.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    policy = load_hf_policy(tmp_path / "sft", device="cpu", dtype="bfloat16", attn_implementation="eager")
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    assert policy.model.config._attn_implementation == "eager"
    assert len(policy.chat([{"role": "user", "content": "go"}], n=1)) == 1
