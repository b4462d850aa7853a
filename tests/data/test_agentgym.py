import json

import pytest

from agentrm.data.agentgym import load_trajectories
from agentrm.data.schema import DataFormatError


def record(item_id="webshop_7", reward=1.0):
    return {
        "item_id": item_id,
        "conversations": [
            {"from": "human", "value": "You are a shopping agent.", "loss": None},
            {"from": "gpt", "value": "OK", "loss": False},
            {"from": "human", "value": "Find a red mug."},
            {"from": "gpt", "value": "Thought: search.\nAction: search[red mug]", "loss": True},
            {"from": "human", "value": "Observation: 3 results"},
            {"from": "gpt", "value": "Action: click[buy]", "loss": True},
        ],
        "reward": reward,
    }


def test_agentgym_json_array_converts(tmp_path):
    p = tmp_path / "ag.json"
    p.write_text(json.dumps([record(), record("webshop_8", 0.25)]))
    trajs = load_trajectories(p)
    t = trajs[0]
    assert t.id == "webshop_7" and t.task == "webshop"
    assert "Find a red mug." in t.instruction and "OK" in t.instruction
    assert [s.action for s in t.steps] == ["Thought: search.\nAction: search[red mug]", "Action: click[buy]"]
    assert t.steps[0].observation == "Observation: 3 results" and t.steps[1].observation == ""
    assert t.success and not trajs[1].success and trajs[1].reward == 0.25


def test_agentgym_jsonl_error_names_line_and_field(tmp_path):
    bad = record()
    bad["conversations"][4]["from"] = "system"
    p = tmp_path / "ag.jsonl"
    p.write_text(json.dumps(record()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as e:
        load_trajectories(p)
    assert e.value.line == 2 and e.value.field == "conversations[4].from"


def test_agentgym_non_alternating_turns(tmp_path):
    bad = record()
    bad["conversations"].insert(4, {"from": "gpt", "value": "again"})
    p = tmp_path / "ag.json"
    p.write_text(json.dumps([bad]))
    with pytest.raises(DataFormatError, match="alternate"):
        load_trajectories(p)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_trajectories(tmp_path / "nope.jsonl")


def test_missing_reward_is_marked_unlabeled_not_a_failure(tmp_path):
    rec = record()
    del rec["reward"]
    p = tmp_path / "l.json"
    p.write_text(json.dumps([rec, record("webshop_9", 1.0)]))
    a, b = load_trajectories(p)
    assert a.meta == {"unlabeled": True} and "unlabeled" not in b.meta
