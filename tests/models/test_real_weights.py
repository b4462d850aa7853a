"""The real SmolLM2-135M-Instruct / Gemma-3-270M weights (``-m slow``; the first run imports them, ~40-80 s each):
named loading, generation with the paper-style prompt, the judge on real output, LoRA value RM export/reload."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.registry import make_env
from agentrm.judge import JudgeScorer
from agentrm.lit.trainable import apply_lora
from agentrm.models.backbone import build_backbone
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import load_tokenizer
from agentrm.policies.base import start_history
from agentrm.policies.hf import HFPolicy
from agentrm.policies.prompt import AgentPrompt
from agentrm.scoring import ValueRMScorer
from tests.real_models import weights_or_skip

pytestmark = pytest.mark.slow
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    weights_or_skip(SMOL)
    torch.set_num_threads(1)
    return build_backbone(SMOL, causal_lm=True, dtype="float32"), load_tokenizer(SMOL)


def test_named_model_loads_and_answers(smol):
    model, tok = smol
    assert model.name_or_path == SMOL and model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    reply = HFPolicy(model, tok, temperature=0.0, max_new_tokens=12).chat(
        [{"role": "user", "content": "What is the capital of France?"}])[0]
    assert "Paris" in reply


def test_paper_prompt_generation_is_validated(smol):
    model, tok = smol
    env = make_env("babyai:GoToRedBall?max_steps=8")
    obs = env.reset(1000)
    pol = HFPolicy(model, tok, temperature=0.0, max_new_tokens=40, prompt=AgentPrompt())
    [action] = pol.propose(env, start_history("babyai/GoToRedBall", f"{env.instruction}\n{obs}"), k=1)
    s = pol.reply_stats
    assert s.replies == 1
    # either a valid canonical action, or a counted invalid reply (greedy: no redraw)
    assert (env.canonical_action(action) == action and s.invalid == 0) or (s.invalid == 1 and s.unresolved == 1)
    env.close()


def test_judge_parses_the_instruct_models_output(smol):
    model, tok = smol
    traj = Trajectory("j", "babyai/GoToRedBall", "Mission: go to the red ball.\nRed ball 1 ahead.",
                      [Step("move forward", "Red ball right in front of you.")], reward=1.0, success=True)
    cands = [Step("move forward", "Red ball 1 ahead."), Step("turn left", "Wall 1 ahead.")]
    for mode in ("pointwise", "listwise"):
        judge = JudgeScorer(HFPolicy(model, tok, temperature=0.0, max_new_tokens=48), mode=mode)
        scores = judge.score_candidates(traj, cands)
        assert scores.shape == (2,)
        # every reply is either parsed into a score in [0, 1] or counted as unparsed (score nan)
        n_nan = sum(math.isnan(float(x)) for x in scores)
        assert all(0.0 <= float(x) <= 1.0 for x in scores if not math.isnan(float(x)))
        if mode == "pointwise":
            assert judge.unparsed == n_nan and judge.replies == 2
        else:
            assert judge.replies == 1 and (judge.unparsed == 1) == (n_nan == 2)


def test_lora_value_rm_on_real_weights_reloads_by_name(tmp_path):
    weights_or_skip(SMOL)
    torch.set_num_threads(1)
    tok = load_tokenizer(SMOL)
    bb = apply_lora(build_backbone(SMOL), {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                           "init_lora_weights": False}, "FEATURE_EXTRACTION")
    model = ValueRewardModel(bb).eval()
    prefix = Trajectory("p", "t", "Mission: go to the red ball.", [Step("turn left", "Wall.")], 0.0, False)
    cands = [Step("move forward", "Red ball 1 ahead."), Step("toggle", "Nothing happens.")]
    before = ValueRMScorer(model, tok).score_candidates(prefix, cands)
    model.save_pretrained(tmp_path / "rm", tokenizer=tok)
    assert (tmp_path / "rm" / "adapter_config.json").exists() and not (tmp_path / "rm" / "base").exists()
    assert json.loads((tmp_path / "rm" / "agentrm_config.json").read_text())["base_model"] == SMOL  # portable name
    again = ValueRewardModel.from_pretrained(tmp_path / "rm").eval()
    torch.testing.assert_close(ValueRMScorer(again, tok).score_candidates(prefix, cands), before, atol=1e-5, rtol=0)
