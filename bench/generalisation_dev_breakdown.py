"""``val_unseen`` per task type: where the value RM's step AUROC on the development set comes from.

``python -m agentrm.fit`` logs one pooled ``val_unseen/auroc`` (every step of every development trajectory
that survives truncation, value against the trajectory's success). This scores the same steps with an exported value RM
(tokenised as in training, the ``max_length`` the export records: the oldest steps of long trajectories are dropped) and prints,
per task type and pooled: trajectories, success rate, steps read, mean value on successful and failed
trajectories, and the step AUROC (Mann-Whitney, ties counted half). A pooled AUROC below 0.5 with per-type
AUROCs above it means the RM ranks within a type but its level across types is wrong.

    python bench/generalisation_dev_breakdown.py runs/generalisation/rm/tiny/hf_model_selected \\
        runs/generalisation/data/dev_unseen.jsonl
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(value of a step of a successful trajectory > that of a failed one), ties half (torchmetrics' binary
    AUROC, as ``val_unseen/auroc``); nan if a side is empty."""
    if not pos or not neg:
        return float("nan")
    import torch
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.tensor(pos + neg), torch.tensor([1] * len(pos) + [0] * len(neg))))


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rm", type=Path, help="exported value RM directory")
    ap.add_argument("data", type=Path, help="trajectory JSONL (the development set)")
    ap.add_argument("--max_length", type=int, default=None,
                    help="token budget per trajectory (default: the max_length the export records, as search uses)")
    args = ap.parse_args(argv)
    import json

    import torch

    from agentrm.data.collate import collate_trajectories
    from agentrm.data.schema import read_jsonl
    from agentrm.data.tokenize import tokenize_trajectory
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer

    torch.set_num_threads(1)
    model = ValueRewardModel.from_pretrained(args.rm).eval()
    if args.max_length is None:
        recorded = json.loads((args.rm / "agentrm_config.json").read_text()).get("max_length")
        if recorded is None:
            raise SystemExit(f"generalisation_dev_breakdown: {args.rm} records no max_length; pass --max_length")
        args.max_length = int(recorded)
    tok = load_tokenizer(str(args.rm))
    steps: dict[str, dict[bool, list[float]]] = defaultdict(lambda: {True: [], False: []})
    trajs: dict[str, list[bool]] = defaultdict(list)
    for t in read_jsonl(args.data):
        tt = tokenize_trajectory(tok, t, args.max_length)
        if not tt.step_end_idx:
            continue
        values = model.score(collate_trajectories([tt], tok.pad_token_id))[0]
        ok = bool(t.success)
        trajs[t.task].append(ok)
        steps[t.task][ok] += [v for v in values.tolist() if v == v]  # every surviving step, as in validation
    lines = ["| task type | trajectories | success | steps read | mean value (success / failure) | step AUROC |",
             "|---|---:|---:|---:|---|---:|"]
    pooled: dict[bool, list[float]] = {True: [], False: []}
    for task in sorted(steps):
        s = steps[task]
        pooled[True] += s[True]
        pooled[False] += s[False]
        lines.append(_row(task, trajs[task], s))
    lines.append(_row("**pooled**", [o for v in trajs.values() for o in v], pooled))
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def _row(name: str, outcomes: list[bool], s: dict[bool, list[float]]) -> str:
    mean = lambda xs: f"{sum(xs) / len(xs):.3f}" if xs else "–"  # noqa: E731
    return (f"| {name} | {len(outcomes)} | {sum(outcomes) / len(outcomes):.2f} | {len(s[True]) + len(s[False])} | "
            f"{mean(s[True])} / {mean(s[False])} | {auroc(s[True], s[False]):.3f} |")


if __name__ == "__main__":
    main()
