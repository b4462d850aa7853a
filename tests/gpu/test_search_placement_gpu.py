"""Search scorers and HF policies on the GPU: default CUDA/bf16 placement, and an nf4 value RM from a LoRA export."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from agentrm.data.schema import Step, Trajectory
from agentrm.search.build import build_scorer, policy_factory
from agentrm.search.specs import PolicySpec, ScorerSpec


@pytest.fixture(scope="module")
def lora_rm_dir(tmp_path_factory):
    """A value RM saved as a LoRA adapter on a 2-layer LLaMA checkpoint (real architecture, random weights)."""
    from agentrm.lit.trainable import apply_lora
    from agentrm.models.backbone import build_backbone
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer

    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    base = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    build_backbone(config={"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                   vocab_size=len(tok), causal_lm=True).save_pretrained(base)
    tok.save_pretrained(base)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    rm = ValueRewardModel(apply_lora(build_backbone(str(base)), lora, "FEATURE_EXTRACTION"))
    return base, rm.save_pretrained(tmp_path_factory.mktemp("rm") / "hf_model", tokenizer=tok)


def _prefix() -> Trajectory:
    return Trajectory(id="t", task="GoToRedBall", instruction="Go to the red ball.",
                      steps=[Step("turn left", "You see a red ball.")], reward=0.0, success=False)


def test_default_placement_is_cuda_bf16(lora_rm_dir):
    _, d = lora_rm_dir
    scorer = build_scorer(ScorerSpec(path=str(d)))
    p = next(scorer.model.backbone.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    assert scorer.model.value_head.weight.device == p.device
    scores = scorer.score_candidates(_prefix(), [Step("go forward", "ok"), Step("pick up", "ok")])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_scorer_from_a_lora_export_scores_close_to_bf16(lora_rm_dir):
    import bitsandbytes as bnb

    base, d = lora_rm_dir
    cands = [Step("go forward", "ok"), Step("pick up", "ok"), Step("toggle", "ok")]
    full = build_scorer(ScorerSpec(path=str(d), base=str(base), device="cuda:0", dtype="bfloat16"))
    q = build_scorer(ScorerSpec(path=str(d), base=str(base), device="cuda:0", dtype="bfloat16", quantization="nf4"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.model.backbone.modules())
    torch.testing.assert_close(q.score_candidates(_prefix(), cands), full.score_candidates(_prefix(), cands),
                               rtol=0.1, atol=0.1)


def test_hf_policy_goes_to_the_gpu(lora_rm_dir):
    base, _ = lora_rm_dir
    make = policy_factory(PolicySpec(kind="hf", model=str(base), max_new_tokens=4))
    policy = make(0, True)
    assert next(policy.model.parameters()).device.type == "cuda"
    assert len(policy.chat([{"role": "user", "content": "go"}])) == 1
