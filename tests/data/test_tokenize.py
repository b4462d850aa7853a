import math

import pytest

from agentrm.data.collate import collate_trajectories
from agentrm.data.tokenize import ChatTemplateError, tokenize_trajectory
from tests.conftest import make_trajectory


def test_step_ends_close_the_observation_and_action_ends_the_action(tiny_tokenizer):
    t = make_trajectory("a", 4)
    tt = tokenize_trajectory(tiny_tokenizer, t)
    end_id = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    assert len(tt.step_end_idx) == len(tt.action_end_idx) == 4
    assert all(tt.input_ids[i] == end_id for i in tt.step_end_idx + tt.action_end_idx)
    for i, (a, e) in enumerate(zip(tt.action_end_idx, tt.step_end_idx)):
        assert tiny_tokenizer.decode(tt.input_ids[:a]).endswith(t.steps[i].action)
        assert tiny_tokenizer.decode(tt.input_ids[:e]).endswith(t.steps[i].observation)
        assert a < e
    assert tt.step_end_idx[-1] == len(tt.input_ids) - 2  # last <|end|>, then the template's newline
    assert tt.step_values == [s.value for s in t.steps]


def test_truncation_keeps_the_head_and_the_most_recent_whole_steps(tiny_tokenizer):
    t = make_trajectory("a", 4)
    full = tokenize_trajectory(tiny_tokenizer, t)
    end_id = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    head = full.step_start_idx[0] - 3  # well inside the instruction turn's rendering
    for budget in range(full.step_end_idx[0], len(full.input_ids)):
        tt = tokenize_trajectory(tiny_tokenizer, t, max_length=budget)
        k = tt.first_step
        assert len(tt.input_ids) <= budget
        assert tt.input_ids[:head] == full.input_ids[:head]  # BOS and instruction kept
        assert tt.step_values == full.step_values[k:] and len(tt.step_parent) == len(tt.step_action) == 4 - k
        assert tt.step_parent == full.step_parent[k:]  # sibling identity is the full context's
        if k < 4:  # the kept steps are the newest, whole, and their tokens are the full rendering's tail
            shift = full.step_end_idx[-1] - tt.step_end_idx[-1]
            assert tt.step_end_idx == [e - shift for e in full.step_end_idx[k:]]
            last = full.step_end_idx[-1] + 1  # the template's trailing tokens (no label) go first
            tail = full.input_ids[full.step_end_idx[k - 1] + 1 : last] if k else full.input_ids[:last]
            assert tt.input_ids[len(tt.input_ids) - len(tail) :] == tail
            assert all(tt.input_ids[i] == end_id for i in tt.step_end_idx + tt.action_end_idx)
            assert tiny_tokenizer.decode(tt.input_ids[: tt.step_end_idx[-1]]).endswith(t.steps[-1].observation)
            assert tiny_tokenizer.decode(tt.input_ids[:head]) == tiny_tokenizer.decode(full.input_ids[:head])
    # the rule drops as few steps as possible: trailing template tokens first, then the oldest step
    assert tokenize_trajectory(tiny_tokenizer, t, max_length=full.step_end_idx[-1] + 1).first_step == 0
    assert tokenize_trajectory(tiny_tokenizer, t, max_length=full.step_end_idx[-1]).first_step == 1
    assert tokenize_trajectory(tiny_tokenizer, t, max_length=len(full.input_ids)).first_step == 0


def test_zero_steps_and_collate(tiny_tokenizer):
    empty = tokenize_trajectory(tiny_tokenizer, make_trajectory("e", 0))
    assert empty.step_end_idx == [] and empty.step_values == [] and len(empty.input_ids) > 0
    two = tokenize_trajectory(tiny_tokenizer, make_trajectory("b", 2))
    b = collate_trajectories([empty, two], pad_token_id=tiny_tokenizer.pad_token_id)
    assert b["input_ids"].shape == (2, len(two.input_ids))
    assert b["step_mask"].tolist() == [[False, False], [True, True]]
    assert math.isnan(b["step_values"][0, 0]) and b["step_values"][1].tolist() == pytest.approx(two.step_values)
    assert b["attention_mask"][0].sum() == len(empty.input_ids)


def test_siblings_share_parent_key(tiny_tokenizer):
    a = make_trajectory("a", 3)
    b = make_trajectory("b", 3)
    b.steps[2].action = "turn left"
    ta, tb = tokenize_trajectory(tiny_tokenizer, a), tokenize_trajectory(tiny_tokenizer, b)
    assert ta.step_parent == tb.step_parent
    assert ta.step_action[:2] == tb.step_action[:2] and ta.step_action[2] != tb.step_action[2]


def test_template_without_prefix_property_is_rejected(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        tokenize_trajectory(tok, make_trajectory("a", 2))
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        tokenize_trajectory(tok, make_trajectory("a", 2))


def test_step_start_covers_exactly_the_action(tiny_tokenizer):
    t = make_trajectory("a", 3)
    tt = tokenize_trajectory(tiny_tokenizer, t)
    for i, (a, e) in enumerate(zip(tt.step_start_idx, tt.action_end_idx)):
        assert tiny_tokenizer.decode(tt.input_ids[a:e]) == t.steps[i].action
    b = collate_trajectories([tt], pad_token_id=tiny_tokenizer.pad_token_id)
    tok_step = b["token_step"][0]
    for i, (a, e) in enumerate(zip(tt.step_start_idx, tt.action_end_idx)):
        assert (tok_step[a : e + 1] == i).all()
    assert int((tok_step >= 0).sum()) == sum(e - a + 1 for a, e in zip(tt.step_start_idx, tt.action_end_idx))
