"""Real chat templates (ChatML, Gemma) and real architectures (LLaMA/SmolLM2, Gemma 3) through tokenisation,
packed scoring, LoRA, export/reload and merge.  Small config-built models with the real vocabularies."""

from __future__ import annotations

import pytest
import torch

from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.lit.trainable import apply_lora, linear_module_names
from agentrm.models.backbone import build_backbone
from agentrm.models.export import merge_adapter
from agentrm.models.head_call import final_hidden
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import ValueRewardModel
from agentrm.scoring import ImplicitPRMScorer, ValueRMScorer
from tests.real_models import NAMES, TURN_CLOSE, real_tokenizer, tiny_config
from tests.test_scoring import _alone

ATOL = 1e-4
STEPS = [
    Step("Thought: the ball is ahead.\nAction: move forward", "Facing north. Red ball 2 ahead."),
    Step("turn left", "Facing west. Wall 1 ahead, grey box 1 right."),
    Step("pick up", "You cannot pick that up."),
]
CANDS = [Step("move forward", "Red ball 1 ahead."), Step("Action: turn right", "Facing east. Wall 3 ahead."),
         Step("toggle", "Nothing happens."), Step("pick up the red ball now please", "Mission complete.")]


@pytest.fixture(scope="module", params=NAMES)
def name_tok(request):
    return request.param, real_tokenizer(request.param)


def _traj(n: int) -> Trajectory:
    return Trajectory("t", "babyai/GoToRedBall", "Mission: go to the red ball.\nFacing south. Red ball 4 ahead.",
                      STEPS[:n], reward=1.0, success=True)


def test_step_spans_exact_under_the_real_template(name_tok):
    name, tok = name_tok
    close = tok.convert_tokens_to_ids(TURN_CLOSE[name])
    tt = tokenize_trajectory(tok, _traj(3))
    ids = tt.input_ids
    for i, s in enumerate(STEPS):
        a, e, end = tt.step_start_idx[i], tt.action_end_idx[i], tt.step_end_idx[i]
        assert tok.decode(ids[a:e]).strip() == s.action  # exactly the action, nothing of the turn header
        assert ids[e] == close and ids[end] == close  # the tokens closing the action and observation turns
        assert s.observation in tok.decode(ids[e + 1 : end])
    # truncation drops the oldest whole step and keeps the head and the two newest steps whole
    cut = tokenize_trajectory(tok, _traj(3), max_length=tt.step_end_idx[2] - 2)
    assert cut.first_step == 1 and len(cut.step_values) == 2 and len(cut.input_ids) <= tt.step_end_idx[2] - 2
    shift = tt.step_end_idx[2] - cut.step_end_idx[1]
    assert cut.step_end_idx == [e - shift for e in tt.step_end_idx[1:]]
    assert all(cut.input_ids[e] == close for e in cut.step_end_idx + cut.action_end_idx)
    for i, s in enumerate(STEPS[1:3]):
        a, e = cut.step_start_idx[i], cut.action_end_idx[i]
        assert tok.decode(cut.input_ids[a:e]).strip() == s.action


def test_system_message_lands_in_the_first_turn(name_tok):
    name, tok = name_tok
    msgs = [{"role": "system", "content": "RULES"}, {"role": "user", "content": "TASK"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if name == "gemma3-270m":  # no system role: the rules head the first user turn
        assert text == "<bos><start_of_turn>user\nRULES\n\nTASK<end_of_turn>\n<start_of_turn>model\n"
    else:
        assert text.startswith("<|im_start|>system\nRULES<|im_end|>\n<|im_start|>user\nTASK<|im_end|>")


def _backbone(name, tok, causal_lm: bool):
    torch.manual_seed(0)
    return build_backbone(config=tiny_config(name), vocab_size=len(tok), causal_lm=causal_lm,
                          attn_implementation="sdpa")


@pytest.mark.parametrize("kind", ["value_rm", "implicit_prm"])
def test_packed_equals_alone_on_the_real_architecture(name_tok, kind, monkeypatch):
    name, tok = name_tok
    prefix = _traj(2)
    if kind == "value_rm":
        model = ValueRewardModel(_backbone(name, tok, False)).eval()
        torch.nn.init.normal_(model.value_head.weight, std=1.0)
        make = lambda pack, path=None: ValueRMScorer(model, tok, pack=pack, path=path)  # noqa: E731
        cands = CANDS
    else:
        model = ImplicitPRM(_backbone(name, tok, True), beta=1.0)
        with torch.no_grad():
            for p in model.policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        make = lambda pack, path=None: ImplicitPRMScorer(  # noqa: E731
            model, tok, include_prefix=False, pack=pack, path=path
        )
        cands = [c.action for c in CANDS]
    expect = _alone(model, tok, prefix, CANDS)[:, -1]
    for pack in (True, False):
        scorer = make(pack)
        torch.testing.assert_close(scorer.score_candidates(prefix, cands), expect, atol=ATOL, rtol=0)
        assert scorer.last_packed is pack
    auto = make("auto")
    auto.score_candidates(prefix, cands)
    # LLaMA scores against the prefix cache; Gemma 3's sliding window is shorter than this context, so
    # its cache would evict keys and auto packs instead (with a mask per layer type)
    assert auto.last_path == ("packed" if name == "gemma3-270m" else "cached")
    if name != "gemma3-270m":
        torch.testing.assert_close(make(True, "cached").score_candidates(prefix, cands), expect, atol=ATOL, rtol=0)
    if name == "gemma3-270m":
        # the context is longer than the 16-token window, so the window matters: one mask for all layers is wrong
        ctx = len(tokenize_trajectory(tok, prefix).input_ids)
        assert ctx > tiny_config(name)["sliding_window"]
        monkeypatch.setattr("agentrm.scoring.layouts.packed_attention_mask", lambda allowed, pos, cfg, dt: allowed)
        wrong = make(True).score_candidates(prefix, cands)
        assert (wrong - expect).abs().max() > 1e-3


def test_final_hidden_gives_the_models_logits(name_tok):
    """The kernels read ``hidden_states[-1] @ lm_head``: it must be the model's own logits (final norm, no softcap)."""
    name, tok = name_tok
    model = _backbone(name, tok, True).eval()
    ids = torch.tensor([tokenize_trajectory(tok, _traj(1)).input_ids])
    with torch.no_grad():
        h = final_hidden(model, ids, torch.ones_like(ids))
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(h @ model.get_output_embeddings().weight.T, logits, atol=1e-4, rtol=1e-4)


def test_lora_targets_found_by_name(name_tok):
    name, tok = name_tok
    model = _backbone(name, tok, False)
    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert linear_module_names(model) == names
    peft_model = apply_lora(model, {"r": 4, "target_modules": names}, "FEATURE_EXTRACTION")
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert n_lora == len(names) * tiny_config(name)["num_hidden_layers"]
    with pytest.raises(ValueError, match="c_attn.*match no linear layer"):
        apply_lora(_backbone(name, tok, False), {"r": 4, "target_modules": ["q_proj", "c_attn"]}, "FEATURE_EXTRACTION")


def test_export_reload_and_merge_give_identical_scores(name_tok, tmp_path):
    name, tok = name_tok
    bb = apply_lora(_backbone(name, tok, False),
                    {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": False},
                    "FEATURE_EXTRACTION")
    model = ValueRewardModel(bb, value_activation="sigmoid").eval()
    prefix = _traj(2)
    before = ValueRMScorer(model, tok).score_candidates(prefix, CANDS)
    model.save_pretrained(tmp_path / "rm", tokenizer=tok)
    again = ValueRewardModel.from_pretrained(tmp_path / "rm").eval()
    assert again.config.model_type == tiny_config(name)["model_type"]
    torch.testing.assert_close(ValueRMScorer(again, tok).score_candidates(prefix, CANDS), before, atol=1e-6, rtol=0)
    merge_adapter(tmp_path / "rm", tmp_path / "merged")
    merged = ValueRewardModel.from_pretrained(tmp_path / "merged").eval()
    assert not hasattr(merged.backbone, "peft_config")
    torch.testing.assert_close(ValueRMScorer(merged, tok).score_candidates(prefix, CANDS), before, atol=1e-5, rtol=0)
