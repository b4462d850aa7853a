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


def test_truncation_keeps_labels_aligned(tiny_tokenizer):
    t = make_trajectory("a", 4)
    full = tokenize_trajectory(tiny_tokenizer, t)
    # cut in the middle of step 3's observation: steps 0..1 survive, the cut step is dropped
    cut = full.step_end_idx[2] - 1
    assert cut > full.action_end_idx[2]  # the cut step's action is whole, its observation is not
    tt = tokenize_trajectory(tiny_tokenizer, t, max_length=cut)
    assert len(tt.input_ids) == cut
    assert tt.step_end_idx == full.step_end_idx[:2]
    assert tt.step_values == full.step_values[:2]
    assert tt.action_end_idx == full.action_end_idx[:2] and tt.step_start_idx == full.step_start_idx[:2]
    assert len(tt.step_parent) == len(tt.step_action) == 2
    # exactly at a step end: that step survives
    tt2 = tokenize_trajectory(tiny_tokenizer, t, max_length=full.step_end_idx[1] + 1)
    assert tt2.step_end_idx == full.step_end_idx[:2]


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
