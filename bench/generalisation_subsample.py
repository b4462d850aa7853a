"""A balanced subsample of the generalisation training data, for RMs whose cost grows with the data size.

The frozen-backbone RMs of ``docs/generalisation.md`` pay one backbone forward per labelled state
(``python -m agentrm.precompute``), ~2 h of one core for the whole 33k-state training set. This draws
``--states`` labelled states from **every** training task type: an equal share per family (BabyAI,
ScienceWorld, TextWorld: TextWorld has one task type and BabyAI ten, so a share per type would leave TextWorld
6% of the data), within a family an equal share per task type, whole episode groups in a seeded order (a task type
with fewer states gives its remainder to the family's others: the draw of ``bench/generalisation_scaling.py``;
a family with fewer states than its share, to the families after it in name order). It writes them as one JSONL file and prints the states per task type. Every
RM of the backbone comparison trains on this file, the tiny RM from scratch included, so the comparison is on
the same data.

    python bench/generalisation_subsample.py --states 9000 --out runs/generalisation/backbones/train_sub.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generalisation_scaling import TRAIN, draw, group_states, read_groups, type_order  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", type=int, default=9000, help="labelled states to draw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, nargs="+", default=TRAIN, help="training files to draw from")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"generalisation_subsample: {args.out} exists; remove it or pick another path")
    groups = read_groups(args.data)
    families = sorted({t.split("/")[0] for t in groups})
    lines, states = [], 0
    for i, fam in enumerate(families):  # a family short of its share leaves the rest to those after it
        budget = (args.states - states) // (len(families) - i)
        types = [t for t in type_order(list(groups), args.seed) if t.startswith(fam + "/")]
        fam_lines, fam_states = draw(groups, types, budget, args.seed)
        lines += fam_lines
        states += fam_states
    per_type: Counter[str] = Counter()
    for line in lines:
        per_type[json.loads(line)["task"]] += group_states([line])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(args.out)
    print(f"{args.out}: {len(lines)} records, {states} labelled states, {len(per_type)} task types")
    for task, n in sorted(per_type.items()):
        print(f"  {task}: {n}")
    return dict(per_type)


if __name__ == "__main__":
    main()
