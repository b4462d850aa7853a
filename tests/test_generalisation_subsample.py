"""The balanced subsample of the backbone comparison (bench/generalisation_subsample.py): whole episode groups,
an equal share of labelled states per family whatever the number of task types, the same file from the same
seed, nothing overwritten."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from bench.generalisation_subsample import main


def _records(task: str, groups: int, steps: int) -> list[dict]:
    out = []
    for g in range(groups):
        gid = f"{task}-{g}"
        main_rec = {"id": gid, "task": task, "instruction": "go", "success": g % 2 == 0, "reward": float(g % 2 == 0),
                    "steps": [{"action": "a", "observation": "o", "value": 0.5} for _ in range(steps)],
                    "meta": {"group": gid}}
        branch = {**main_rec, "id": f"{gid}-b", "meta": {"group": gid, "branch_at": steps - 2}}
        out += [main_rec, branch]
    return out


def test_equal_share_per_family_whole_groups_and_no_overwrite(tmp_path):
    files = {"babyai": [("babyai/A", 40, 5), ("babyai/B", 40, 5), ("babyai/C", 40, 5)],
             "textworld": [("textworld/custom", 60, 5)], "sciworld": [("sciworld/boil", 10, 5)]}
    paths = []
    for fam, types in files.items():
        p = tmp_path / f"train_{fam}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for t in types for r in _records(*t)))
        paths.append(str(p))
    out = tmp_path / "sub.jsonl"
    per_type = main(["--states", "420", "--data", *paths, "--out", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_group = defaultdict(int)
    for r in lines:
        by_group[r["meta"]["group"]] += 1
    assert set(by_group.values()) == {2}  # a main record never without its branch, nor the reverse
    fam = defaultdict(int)
    for t, n in per_type.items():
        fam[t.split("/")[0]] += n
    # families in name order, a third each; sciworld holds 10 groups x 7 states = 70 < its share (140): all of
    # it, and textworld (after it) takes the rest
    assert fam["sciworld"] == 70
    assert 140 <= fam["babyai"] < 140 + 7 and sum(fam.values()) >= 420
    assert max(per_type[f"babyai/{x}"] for x in "ABC") - min(per_type[f"babyai/{x}"] for x in "ABC") <= 7
    again = tmp_path / "again.jsonl"
    main(["--states", "420", "--data", *paths, "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        main(["--states", "420", "--data", *paths, "--out", str(out)])
