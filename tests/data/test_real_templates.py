"""The Llama-3, Qwen2.5 and Gemma 3 chat templates: step spans, truncation and candidate scoring through them.

The templates are the models' own (``tests/assets/templates/*.jinja``: Meta-Llama-3-8B-Instruct,
Qwen2.5-7B-Instruct, gemma-3-*-it, as in their ``tokenizer_config.json``). A test tokenizer is the
shipped tiny BPE (``agentrm/assets/tiny_tokenizer``) with each model's special tokens added and its
template set, saved and read back through :func:`agentrm.paths.load_tokenizer`, which is how agentrm
gets a template: the tokenizer's ``chat_template`` (the 8B configs name the tokenizer, nothing else).

What each template does differently: Llama-3 trims every message and opens with ``<|begin_of_text|>``;
Qwen2.5 adds a default system turn when there is none; Gemma 3 has no system role (a system message
heads the first user turn), calls the assistant ``model`` and trims.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import head_tokens, render, tokenize_initial_state, tokenize_trajectory
from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import PROJECT_ROOT, load_tokenizer
from agentrm.scoring import ImplicitPRMScorer, ValueRMScorer, tokenize_candidates
from tests.lit.conftest import TINY_BACKBONE

TEMPLATES = Path(__file__).resolve().parents[1] / "assets" / "templates"
SPECS = {  # template: special tokens (bos, eos, pad, others), the token closing a turn, the 8B configs using it
    "llama3": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None,
               "others": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
               "close": "<|eot_id|>", "configs": "configs/models/llama3-8b.yaml", "hub": "meta-llama/Meta-Llama-3-8B-Instruct"},
    "qwen2.5": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "others": ["<|im_start|>"],
                "close": "<|im_end|>", "configs": "configs/models/qwen2.5-7b.yaml", "hub": "Qwen/Qwen2.5-7B-Instruct"},
    "gemma3": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "others": ["<start_of_turn>", "<end_of_turn>"],
               "close": "<end_of_turn>", "configs": None, "hub": "google/gemma-3-1b-it"},
}
# exact renderings of one user/assistant/user exchange (+ generation prompt): the templates' known output
RENDERED = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nGo.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nturn left<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nA wall.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nGo.<|im_end|>\n<|im_start|>assistant\nturn left<|im_end|>\n"
               "<|im_start|>user\nA wall.<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<bos><start_of_turn>user\nGo.<end_of_turn>\n<start_of_turn>model\nturn left<end_of_turn>\n"
              "<start_of_turn>user\nA wall.<end_of_turn>\n<start_of_turn>model\n",
}
STEPS = [
    Step("Thought: the ball is ahead.\nAction: move forward", "Facing north. Red ball 2 ahead."),
    Step("  turn left\n", "\nFacing west. Wall 1 ahead, grey box 1 right.  "),  # whitespace a template may trim
    Step("pick up", "You cannot pick that up."),
    Step("toggle", ""),  # an empty observation (a withheld terminal reply)
]
CANDS = [Step("move forward", "Red ball 1 ahead."), Step("Action: turn right", "Facing east. Wall 3 ahead."),
         Step("", "Nothing happens."), Step("pick up the red ball now please", "")]
ATOL = 1e-4


def make_tokenizer(name: str, directory: Path):
    """The tiny BPE with ``name``'s special tokens and chat template, saved to ``directory`` and loaded back."""
    from transformers import AutoTokenizer

    spec = SPECS[name]
    tok = AutoTokenizer.from_pretrained(str(PROJECT_ROOT / "agentrm" / "assets" / "tiny_tokenizer"))
    named = {k: spec[k] for k in ("bos", "eos", "pad") if spec[k]}
    tok.add_special_tokens({**{f"{k}_token": v for k, v in named.items()}, "additional_special_tokens": spec["others"]})
    if spec["bos"] is None:
        tok.bos_token = None
    if spec["pad"] is None:
        tok.pad_token = None  # as the hub tokenizer: load_tokenizer falls back to eos
    if spec["bos"]:  # like the real ones, encoding with special tokens prepends BOS (the rendering has it already)
        from tokenizers import processors

        bos = (spec["bos"], tok.convert_tokens_to_ids(spec["bos"]))
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    tok.save_pretrained(directory)
    return load_tokenizer(str(directory))


@pytest.fixture(scope="module", params=list(SPECS))
def name_tok(request, tmp_path_factory):
    name = request.param
    return name, make_tokenizer(name, tmp_path_factory.mktemp(f"tok-{name}"))


def _traj(n: int, steps: list[Step] = STEPS) -> Trajectory:
    return Trajectory("t", "babyai/GoToRedBall", "Mission: go to the red ball.\nFacing south. Red ball 4 ahead.",
                      steps[:n], reward=1.0, success=True)


def _trimmed(name: str, text: str) -> str:
    """Message content as the template writes it (Qwen2.5 keeps it verbatim, the others trim)."""
    return text if name == "qwen2.5" else text.strip()


def test_the_template_is_read_from_the_tokenizer_and_renders_as_the_model_does(name_tok):
    name, tok = name_tok
    assert tok.chat_template == (TEMPLATES / f"{name}.jinja").read_text()
    msgs = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": "turn left"},
            {"role": "user", "content": "A wall."}]
    assert render(tok, msgs, generation_prompt=True) == RENDERED[name]
    spec = SPECS[name]
    for token in [spec["close"], *spec["others"]]:  # each special is one token, never split by the BPE
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    assert tok.pad_token_id is not None  # load_tokenizer's eos fallback for Llama-3 (no pad token)
    if spec["bos"]:
        assert tok("Go.")["input_ids"][0] == tok.bos_token_id  # the BOS a rendering must not get twice


def test_system_message_placement(name_tok):
    """Gemma has no system role: the rules head the first user turn; Qwen replaces its default system turn."""
    name, tok = name_tok
    text = render(tok, [{"role": "system", "content": "RULES"}, {"role": "user", "content": "TASK"}], True)
    expect = {
        "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nRULES<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nTASK<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "qwen2.5": "<|im_start|>system\nRULES<|im_end|>\n<|im_start|>user\nTASK<|im_end|>\n<|im_start|>assistant\n",
        "gemma3": "<bos><start_of_turn>user\nRULES\n\nTASK<end_of_turn>\n<start_of_turn>model\n",
    }
    assert text == expect[name]


def test_step_spans_are_exact(name_tok):
    name, tok = name_tok
    close = tok.convert_tokens_to_ids(SPECS[name]["close"])
    traj = _traj(len(STEPS))
    tt = tokenize_trajectory(tok, traj)
    ids = tt.input_ids
    assert ids == tok(render(tok, traj.to_messages()), add_special_tokens=False)["input_ids"][: len(ids)]
    if SPECS[name]["bos"]:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    batch = collate_trajectories([tt], tok.pad_token_id)
    for i, s in enumerate(STEPS):
        a, e, end = tt.step_start_idx[i], tt.action_end_idx[i], tt.step_end_idx[i]
        assert tok.decode(ids[a:e]) == _trimmed(name, s.action)  # the action exactly: no header, no whitespace
        assert ids[e] == close and ids[end] == close  # the tokens closing the action and the observation turns
        assert tok.decode(ids[e + 1 : end]).endswith(_trimmed(name, s.observation))
        assert (batch["token_step"][0] == i).nonzero().flatten().tolist() == list(range(a, e + 1))
        assert ids[a - 1] != close and SPECS[name]["close"] not in tok.decode(ids[a:e])
    # after the last close only the template's trailing newline (Qwen, Gemma), which carries no label
    assert tok.decode(ids[tt.step_end_idx[-1] + 1 :]) == ("" if name == "llama3" else "\n")
    head = head_tokens(tok, traj.to_messages(), [s for s, _ in tok(render(tok, traj.to_messages()),
                                                                   add_special_tokens=False,
                                                                   return_offsets_mapping=True)["offset_mapping"]])
    assert ids[head - 1] == close and head <= tt.step_start_idx[0]  # the head ends with the instruction turn
    if name == "qwen2.5":  # the default system turn is part of the head
        assert "You are Qwen" in tok.decode(ids[:head])
    initial = tokenize_initial_state(tok, traj)  # the state before any step, read where the head closes
    assert initial.input_ids == ids[:head] and initial.step_end_idx == [head - 1]


def test_truncation_keeps_the_head_and_the_newest_whole_steps(name_tok):
    name, tok = name_tok
    close = tok.convert_tokens_to_ids(SPECS[name]["close"])
    traj = _traj(len(STEPS))
    full = tokenize_trajectory(tok, traj)
    starts = [s for s, _ in tok(render(tok, traj.to_messages()), add_special_tokens=False,
                                return_offsets_mapping=True)["offset_mapping"]]
    head = head_tokens(tok, traj.to_messages(), starts)
    for drop in (1, 2, 3):
        block = full.step_end_idx[drop - 1] + 1  # step `drop` starts after the previous observation's close
        budget = head + full.step_end_idx[-1] + 1 - block
        cut = tokenize_trajectory(tok, traj, max_length=budget)
        assert cut.first_step == drop and len(cut.step_end_idx) == len(STEPS) - drop
        assert cut.input_ids == full.input_ids[:head] + full.input_ids[block : full.step_end_idx[-1] + 1]
        shift = block - head
        assert cut.step_end_idx == [e - shift for e in full.step_end_idx[drop:]]
        assert cut.step_start_idx == [s - shift for s in full.step_start_idx[drop:]]
        for i, s in enumerate(STEPS[drop:]):
            a, e = cut.step_start_idx[i], cut.action_end_idx[i]
            assert tok.decode(cut.input_ids[a:e]) == _trimmed(name, s.action) and cut.input_ids[e] == close
        # one token less drops one more step
        assert tokenize_trajectory(tok, traj, max_length=budget - 1).first_step == drop + 1
    # not even the newest step fits next to the head: cut on the right, no step
    tiny = tokenize_trajectory(tok, traj, max_length=head + 1)
    assert tiny.step_end_idx == [] and tiny.input_ids == full.input_ids[: head + 1]


def test_candidate_tokens_match_the_training_rendering(name_tok):
    name, tok = name_tok
    prefix = _traj(2)
    ct = tokenize_candidates(tok, prefix, CANDS, with_prefix_steps=True)
    for k, cand in enumerate(CANDS):
        alone = tokenize_trajectory(tok, _traj(3, [*prefix.steps, cand]))
        assert ct.prefix_ids + ct.cand_ids[k] == alone.input_ids[: alone.step_end_idx[-1] + 1]
        assert (ct.prefix_ids + ct.cand_ids[k]).count(tok.bos_token_id) == (1 if SPECS[name]["bos"] else 0)
        p = len(ct.prefix_ids)
        assert p + ct.cand_start[k] == alone.step_start_idx[-1]
        assert p + ct.cand_action_end[k] == alone.action_end_idx[-1]
        assert p + len(ct.cand_ids[k]) - 1 == alone.step_end_idx[-1]
    assert [s for s, _ in ct.prefix_steps] == alone.step_start_idx[:2]
    assert [e for _, e in ct.prefix_steps] == alone.action_end_idx[:2]
    # truncation: the same rule, the head kept, the oldest prefix step dropped first
    longest = max(len(c) for c in ct.cand_ids)
    budget = len(ct.prefix_ids) + longest - 1
    cut = tokenize_candidates(tok, prefix, CANDS, max_length=budget)
    assert cut.dropped_steps == 1 and cut.context_len <= budget
    kept = tokenize_trajectory(tok, _traj(2, [prefix.steps[1], CANDS[0]]))
    assert cut.prefix_ids + cut.cand_ids[0] == kept.input_ids[: kept.step_end_idx[-1] + 1]


def _models(tok):
    torch.manual_seed(0)
    cfg = {**TINY_BACKBONE, "max_position_embeddings": 1024}
    value = ValueRewardModel(build_backbone(config=cfg, vocab_size=len(tok))).eval()
    torch.nn.init.normal_(value.value_head.weight, std=1.0)
    prm = ImplicitPRM(build_backbone(config=cfg, vocab_size=len(tok), causal_lm=True), beta=1.0)
    with torch.no_grad():
        for p in prm.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prm.policy.eval()
    return value, prm


def _alone(model, tok, prefix: Trajectory, cands: list[Step], max_length: int | None = None) -> torch.Tensor:
    """``[K]`` each candidate's own step score, prefix + candidate scored as one ordinary trajectory."""
    out = []
    for cand in cands:
        traj = _traj(len(prefix.steps) + 1, [*prefix.steps, cand])
        batch = collate_trajectories([tokenize_trajectory(tok, traj, max_length)], tok.pad_token_id)
        out.append(model.score(batch)[0, -1])
    return torch.stack(out)


def test_candidates_score_as_prefix_plus_candidate_alone(name_tok):
    name, tok = name_tok
    value, prm = _models(tok)
    prefix = _traj(2)
    expect_v = _alone(value, tok, prefix, CANDS)
    expect_p = _alone(prm, tok, prefix, CANDS)
    assert expect_v.std() > 0 and expect_p.abs().max() > 1e-4
    for path in ("cached", "packed", "plain"):
        got_v = ValueRMScorer(value, tok, path=path).score_candidates(prefix, CANDS)
        torch.testing.assert_close(got_v, expect_v, atol=ATOL, rtol=0)
        got_p = ImplicitPRMScorer(prm, tok, include_prefix=False, path=path).score_candidates(
            prefix, [c.action for c in CANDS])
        torch.testing.assert_close(got_p, expect_p, atol=ATOL, rtol=0)
    # a budget one token short of the longest candidate's context: every candidate loses the oldest prefix
    # step (one prefix for all), as scoring the prefix without it; the longest as training truncates it
    ct = tokenize_candidates(tok, prefix, CANDS)
    longest = max(range(len(CANDS)), key=lambda k: len(ct.cand_ids[k]))
    budget = len(ct.prefix_ids) + len(ct.cand_ids[longest]) - 1
    truncated = _alone(value, tok, _traj(1, prefix.steps[1:]), CANDS)
    for path in ("cached", "packed", "plain"):
        got = ValueRMScorer(value, tok, max_length=budget, path=path).score_candidates(prefix, CANDS)
        torch.testing.assert_close(got, truncated, atol=ATOL, rtol=0)
    trained = _alone(value, tok, prefix, [CANDS[longest]], max_length=budget)
    torch.testing.assert_close(trained, truncated[longest : longest + 1], atol=ATOL, rtol=0)
    assert not torch.allclose(truncated, expect_v, atol=ATOL)  # the dropped step mattered


def test_the_8b_configs_use_a_tested_template():
    """The Llama-3 / Qwen2.5 model-family configs (composed with every recipe) read the tokenizer (hence the
    template) tested here."""
    for spec in SPECS.values():
        if spec["configs"] is None:
            continue
        f = PROJECT_ROOT / spec["configs"]
        cfg = yaml.safe_load(f.read_text())
        assert cfg["data"]["tokenizer"] == spec["hub"], f"{f}: data.tokenizer"
        assert cfg["model"]["init_args"]["backbone"] == spec["hub"], f"{f}: model.init_args.backbone"
