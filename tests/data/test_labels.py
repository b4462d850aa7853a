"""Labels validated against their meaning: value ranges, success rules, unlabeled policies, one class,
too few labels, and what truncation drops (agentrm.data.labels, schema, agentgym, tokenize)."""

import json
import math

import pytest

from agentrm.data.agentgym import load_trajectories, outcome_summary, success_rule
from agentrm.data.labels import (
    LabelError,
    TruncationError,
    apply_unlabeled_policy,
    check_outcomes,
    check_step_values,
    check_steps_left,
    check_unlabeled_for,
    truncation_warning,
)
from agentrm.data.schema import DataError, DataFormatError, Step, Trajectory, parse_value_range, read_jsonl
from agentrm.data.tokenize import TruncationCounts, tokenize_trajectory
from tests.conftest import make_trajectory


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_data_error_is_a_value_error_with_one_base():
    assert issubclass(DataFormatError, DataError) and issubclass(DataError, ValueError)
    assert issubclass(LabelError, DataError) and issubclass(TruncationError, DataError)


@pytest.mark.parametrize("bad, why", [
    ([0, 1, 2], "two numbers"), ("01", "two numbers"), ([1, 0], "low < high"), ([0, 0], "low < high"),
    ([0, float("nan")], "finite"), ([0, True], "finite"), (["a", 1], "finite"),
])
def test_value_range_must_be_two_finite_increasing_numbers(bad, why):
    with pytest.raises(ValueError, match=f"data.value_range must .*{why}"):
        parse_value_range(bad)
    assert parse_value_range([-1, 1]) == (-1.0, 1.0)


@pytest.mark.parametrize("value, problem", [
    (7, "7.0 is outside the declared value range [0, 1]"),
    (-5, "-5.0 is outside the declared value range [0, 1]"),
    (1.0000001, "1.0000001 is outside the declared value range [0, 1]"),
])
def test_out_of_range_values_name_file_line_and_field(tmp_path, value, problem):
    good, bad = make_trajectory("a", 3).to_dict(), make_trajectory("b", 4).to_dict()
    bad["steps"][3]["value"] = value
    p = write_records(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataFormatError) as e:
        read_jsonl(p, value_range=(0.0, 1.0))
    assert str(e.value).startswith(f"{p}:2: field 'steps[3].value': {problem}")
    assert "\n" not in str(e.value)
    read_jsonl(p)  # no declared range: only finiteness is checked (other readers)


def test_range_bounds_are_inclusive_and_other_ranges_are_declared(tmp_path):
    rec = make_trajectory("a", 3).to_dict()
    for s, v in zip(rec["steps"], (0, 1, -0.5)):
        s["value"] = v
    p = write_records(tmp_path / "d.jsonl", [rec])
    with pytest.raises(DataFormatError, match=r"-0.5 is outside the declared value range \[0, 1\]"):
        read_jsonl(p, value_range=(0.0, 1.0))
    assert [s.value for s in read_jsonl(p, value_range=(-1.0, 1.0))[0].steps] == [0, 1, -0.5]


def test_nan_and_string_values_are_refused(tmp_path):
    rec = make_trajectory("a", 2).to_dict()
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(rec).replace('"value": 0.5', '"value": NaN') + "\n")
    with pytest.raises(DataFormatError, match=r"d.jsonl:1: field 'steps\[0\].value': must be finite, got nan"):
        read_jsonl(p, value_range=(0.0, 1.0))
    rec["steps"][1]["value"] = "0.9"
    write_records(p, [rec])
    with pytest.raises(DataFormatError, match=r"field 'steps\[1\].value': expected number or null, got str"):
        read_jsonl(p, value_range=(0.0, 1.0))


def agentgym(item_id, reward=None, **extra):
    conv = [{"from": "human", "value": "Find a red mug."}, {"from": "gpt", "value": "Action: search[red mug]"},
            {"from": "human", "value": "3 results"}, {"from": "gpt", "value": "Action: click[buy]"}]
    rec = {"item_id": item_id, "conversations": conv, **extra}
    if reward is not None:
        rec["reward"] = reward
    return rec


def test_agentgym_success_from_a_declared_threshold_or_field(tmp_path):
    p = tmp_path / "ag.json"
    p.write_text(json.dumps([agentgym(f"webshop_{i}", r) for i, r in enumerate([1.0, 0.75, 0.5, 0.2, 0.0])]))
    assert [t.success for t in load_trajectories(p)] == [True, False, False, False, False]  # default: 1.0
    assert [t.success for t in load_trajectories(p, success_threshold=0.5)] == [True, True, True, False, False]
    line = outcome_summary("ag.json", load_trajectories(p), success_rule())
    assert line == ("ag.json (success = reward >= 1): 5 records: 1 successes, 4 failures; 3 partial rewards "
                    "(0 < reward < 1), 0 counted as successes; 10 steps, 0 with a value")
    assert "3 partial rewards (0 < reward < 1), 2 counted as successes" in outcome_summary(
        "ag.json", load_trajectories(p, success_threshold=0.5), success_rule(0.5))

    p.write_text(json.dumps([agentgym("a_1", 0.3, won=True), agentgym("a_2", won=False), agentgym("a_3")]))
    a, b, c = load_trajectories(p, success_field="won")
    assert (a.success, a.reward, b.success, b.reward) == (True, 0.3, False, 0.0)
    assert not a.meta and not b.meta and c.meta == {"unlabeled": True}
    assert success_rule(success_field="won") == "success = the record's 'won' field"


@pytest.mark.parametrize("records, field, problem", [
    ([agentgym("a_1", won="yes")], "won", "expected bool (data.success_field), got str"),
    ([agentgym("a_1", 1.0)], "won", "missing (data.success_field names it"),
    ([agentgym("a_1", float("inf"))], "reward", "must be finite"),
])
def test_agentgym_label_errors_name_the_record_and_field(tmp_path, records, field, problem):
    p = tmp_path / "ag.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataFormatError) as e:
        load_trajectories(p, success_field="won")
    assert e.value.line == 1 and e.value.field == field and problem in str(e.value)


def unlabeled(n=3, steps=2):
    return [Trajectory(f"d{i}", "t", "go", [Step(f"a{j}", "o") for j in range(steps)], 0.0, False,
                       meta={"unlabeled": True}) for i in range(n)]


def test_unlabeled_policies():
    with pytest.raises(LabelError, match=r"f.json: 3 of 3 records have no 'reward'.*--data.unlabeled success"):
        apply_unlabeled_policy(unlabeled(), "f.json", "error")
    kept = apply_unlabeled_policy(unlabeled(), "f.json", "ignore")
    assert not any(t.success for t in kept) and all(s.value is None for t in kept for s in t.steps)
    demos = apply_unlabeled_policy(unlabeled(), "f.json", "success")
    assert all(t.success and t.reward == 1.0 for t in demos)
    assert all(s.value is None for t in demos for s in t.steps)  # no value is invented without a stated rule
    valued = apply_unlabeled_policy(unlabeled(), "f.json", "success_values", top_value=0.8)
    assert [s.value for t in valued for s in t.steps] == [0.8] * 6
    with pytest.raises(ValueError, match="data.unlabeled must be one of error, success, success_values, ignore"):
        apply_unlabeled_policy(unlabeled(), "f.json", "yes")


def test_unlabeled_records_refused_where_the_rule_gives_wrong_or_no_labels():
    with pytest.raises(LabelError, match="data.unlabeled=success makes 4 records .* no value.*success_values"):
        check_unlabeled_for("step_values", "success", 4, "f.json")
    with pytest.raises(LabelError, match="unlabeled=ignore keeps 4 records .* as failures.*--data.unlabeled success "):
        check_unlabeled_for("outcomes", "ignore", 4, "f.json")
    check_unlabeled_for("outcomes", "success", 4, "f.json")
    check_unlabeled_for("step_values", "success_values", 4, "f.json")
    check_unlabeled_for("step_values", "ignore", 0, "f.json")


def items_of(tok, trajs, max_length=None):
    items = [tokenize_trajectory(tok, t, max_length=max_length) for t in trajs]
    return items, TruncationCounts.of(items)


def test_truncation_counts_match_what_the_tokenizer_dropped(tiny_tokenizer):
    trajs = [make_trajectory(f"t{i}", n) for i, n in enumerate([1, 3, 4, 0])]
    trajs[2].steps[0].value = None  # an unlabelled step among the oldest: a step, not a label, is lost
    full, none = items_of(tiny_tokenizer, trajs)
    assert (none.steps, none.labels, none.steps_dropped, none.labels_dropped, none.truncated) == (8, 7, 0, 0, 0)
    assert none.summary() == "8 steps (7 labelled) of 4 trajectories; truncation dropped nothing"
    budget = next(b for b in range(len(full[2].input_ids), 0, -1)
                  if tokenize_trajectory(tiny_tokenizer, trajs[2], max_length=b).first_step == 1)
    cut, counts = items_of(tiny_tokenizer, trajs, budget)
    assert cut[2].first_step == 1 and cut[0].first_step == cut[3].first_step == 0
    assert counts.steps_dropped == sum(it.first_step for it in cut)
    assert counts.steps_kept == sum(len(it.step_end_idx) for it in cut)
    assert counts.labels_kept == sum(not math.isnan(v) for it in cut for v in it.step_values)
    assert counts.labels == 7 and counts.truncated == sum(it.first_step > 0 for it in cut)
    assert counts.labels_dropped == counts.steps_dropped - 1  # trajectory 2 lost its unlabelled first step
    tiny, t = items_of(tiny_tokenizer, trajs, 4)
    assert (t.steps_kept, t.labels_kept, t.labels_dropped) == (0, 0, 7)
    assert t.as_metrics("data/train")["data/train/labels_dropped"] == 7.0


def test_truncation_warning_above_the_threshold(tiny_tokenizer):
    c = TruncationCounts(trajectories=10, truncated=2, steps=100, steps_dropped=4, labels=50, labels_dropped=3)
    assert truncation_warning(c, "train", 64, 0.05, "labels") == (
        "data.max_length=64 drops 3 of 50 labelled steps (6.0%) of the train split (the oldest steps of 2 "
        "trajectories), above data.truncation_warning=0.05; raise max_length to train on them")
    assert truncation_warning(c, "train", 64, 0.05, "steps") is None  # 4% of the steps
    assert truncation_warning(c, "val", 64, 0.1, "labels") is None


def test_nothing_left_after_truncation_names_max_length(tiny_tokenizer):
    trajs = [make_trajectory(f"t{i}", 2) for i in range(3)]
    items, counts = items_of(tiny_tokenizer, trajs, 4)
    with pytest.raises(TruncationError, match=r"^data.max_length=4 drops every step of the training split \(6 steps "
                                              r"of 3 trajectories of f.jsonl\).*raise it$"):
        check_steps_left(counts, "f.jsonl", 4)
    with pytest.raises(TruncationError, match=r"^data.max_length=4 drops every labelled step .*6 of 6 labels"):
        check_step_values(items, counts, "f.jsonl", 4, 1, allow_degenerate=True)
    # a step survives but its label does not: still nothing for a value RM
    trajs[0].steps[1].value = None
    full, _ = items_of(tiny_tokenizer, trajs)
    budget = len(full[0].input_ids) - (full[0].step_end_idx[1] - full[0].step_end_idx[0])
    items, counts = items_of(tiny_tokenizer, trajs[:1], budget)
    assert counts.steps_kept == 1 and counts.labels_kept == 0
    check_steps_left(counts, "f.jsonl", budget)
    with pytest.raises(TruncationError, match=f"data.max_length={budget} drops every labelled step"):
        check_step_values(items, counts, "f.jsonl", budget, 1, False)


def test_value_labels_need_values_enough_of_them_and_two_kinds(tiny_tokenizer):
    trajs = [make_trajectory(f"t{i}", 3) for i in range(4)]  # 12 labelled steps, values 1/3, 2/3, 1
    items, counts = items_of(tiny_tokenizer, trajs)
    check_step_values(items, counts, "f.jsonl", 512, min_labels=12, allow_degenerate=False)
    with pytest.raises(LabelError, match=r"^only 12 labelled steps in the training split \(f.jsonl\), fewer than "
                                         r"data.min_labels=32: .*--data.allow_degenerate true"):
        check_step_values(items, counts, "f.jsonl", 512, min_labels=32, allow_degenerate=False)
    check_step_values(items, counts, "f.jsonl", 512, min_labels=32, allow_degenerate=True)
    for t in trajs:
        for s in t.steps:
            s.value = 1.0
    items, counts = items_of(tiny_tokenizer, trajs)
    with pytest.raises(LabelError, match=r"every labelled step of the training split \(12 steps of f.jsonl\) has "
                                         r"the value 1: a value RM would learn a constant"):
        check_step_values(items, counts, "f.jsonl", 512, min_labels=1, allow_degenerate=False)
    check_step_values(items, counts, "f.jsonl", 512, min_labels=1, allow_degenerate=True)
    for t in trajs:
        for s in t.steps:
            s.value = None
    items, counts = items_of(tiny_tokenizer, trajs)
    with pytest.raises(LabelError, match="none of the 4 training trajectories .* has a step value target"):
        check_step_values(items, counts, "f.jsonl", 512, min_labels=1, allow_degenerate=True)


def test_outcome_labels_need_both_classes_and_enough_trajectories(tiny_tokenizer):
    trajs = [make_trajectory(f"t{i}", 2, success=False) for i in range(4)]
    for t, r in zip(trajs, (0.5, 0.75, 0.0, 0.0)):
        t.reward = r
    items, _ = items_of(tiny_tokenizer, trajs)
    with pytest.raises(LabelError, match=r"every one of the 4 training trajectories \(ag.json\) is a failure \(2 of "
                                         r"them have a partial reward 0 < reward < 1, a failure by 'success = reward "
                                         r">= 1': set --data.success_threshold or --data.success_field\)"):
        check_outcomes(items, "ag.json", 1, False, success_rule())
    with pytest.raises(LabelError, match="only 4 training trajectories with a step .* data.min_labels=5"):
        check_outcomes(items, "ag.json", 5, False)
    check_outcomes(items, "ag.json", 5, True)
    trajs[0].success = True
    check_outcomes(items_of(tiny_tokenizer, trajs)[0], "ag.json", 4, False)
    empty, _ = items_of(tiny_tokenizer, [make_trajectory("e", 0), *trajs])  # a trajectory without steps: no label
    with pytest.raises(LabelError, match="only 4 training trajectories with a step"):
        check_outcomes(empty, "ag.json", 5, False)
