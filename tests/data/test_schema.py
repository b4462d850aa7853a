import json

import pytest

from agentrm.data.schema import DataFormatError, read_jsonl, write_jsonl
from tests.conftest import make_trajectory


def test_roundtrip(tmp_path):
    trajs = [make_trajectory("a", 3), make_trajectory("b", 0, success=False, group="a")]
    p = tmp_path / "t.jsonl"
    assert write_jsonl(p, trajs) == 2
    back = read_jsonl(p)
    assert [t.to_dict() for t in back] == [t.to_dict() for t in trajs]
    assert back[1].group == "a" and back[0].group == "a"


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("instruction"), "instruction"),
        (lambda r: r.update(success="yes"), "success"),
        (lambda r: r.update(reward=True), "reward"),
        (lambda r: r["steps"][1].pop("observation"), "steps[1].observation"),
        (lambda r: r["steps"][0].update(value="high"), "steps[0].value"),
        (lambda r: r["steps"].__setitem__(2, "move"), "steps[2]"),
        (lambda r: r.update(steps={}), "steps"),
    ],
)
def test_malformed_record_names_file_line_field(tmp_path, mutate, field):
    good = make_trajectory("a", 3).to_dict()
    bad = make_trajectory("b", 3).to_dict()
    mutate(bad)
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as e:
        read_jsonl(p)
    assert e.value.line == 2 and e.value.field == field
    assert str(p) in str(e.value) and ":2:" in str(e.value)


def test_invalid_json_and_skip_counts(tmp_path, capsys):
    good = json.dumps(make_trajectory("a", 2).to_dict())
    p = tmp_path / "d.jsonl"
    p.write_text(good + "\n{not json\n\n" + good + "\n")
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: field '<json>'"):
        read_jsonl(p)
    kept = read_jsonl(p, skip_invalid=True)
    assert len(kept) == 2
    assert "skipped 1 malformed" in capsys.readouterr().out
