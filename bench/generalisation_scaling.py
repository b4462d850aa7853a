"""Unseen-type success as the number of training task types grows, with the data size held fixed.

From the generalisation training data (``scripts/generalisation_data.sh``), for each type order (``--seeds``)
and each ``k`` in ``--ks`` the script draws a training set of ``--states`` labelled states from ``k`` task types:
the types are the first ``k`` of a seeded order that alternates the families (BabyAI, ScienceWorld, TextWorld,
BabyAI, ScienceWorld, ...; shuffled within each family by the seed), so within an order the sets are nested;
each type gets an equal share of the budget, drawn as whole episode groups (a main trajectory with its sibling
branches) in a seeded order, and a type with fewer states gives its remainder to the others. A tiny value RM
(``configs/generalisation/tiny_value_rm.yaml``) is fitted on each set for exactly ``--steps`` optimiser steps
(same budget for every ``k``; ``val_unseen/*`` on the development set is logged, nothing is selected on it),
then all of them guide the same episodes of the unseen test types of BabyAI and TextWorld (one ``python -m
agentrm.search`` run: greedy, Best-of-1 and Best-of-5 per RM, outcome-blind). Prints a table (per ``k`` and
order: types, states, val metrics, Best-of-5 minus Best-of-1 and minus greedy per family with paired bootstrap
95% intervals; with several orders, a row per ``k`` of the mean over orders: per episode the orders' mean
difference, bootstrapped over episodes) and saves ``--png``. A fit whose ``fit_info.json`` matches its training
set and step budget is reused, and the evaluation resumes, so an interrupted run continues.

    python bench/generalisation_scaling.py --seeds 0 1 2 --ks 1 3 6 12 24 --states 1500 --steps 100 \\
        --episodes 20 --png docs/img/generalisation_scaling.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentrm.data.manifest import TaskCounts  # noqa: E402
from agentrm.search.compare import bootstrap_ci, episode_success, paired_comparisons  # noqa: E402
from bench.generalisation_report import by_family  # noqa: E402
from bench.paper_common import figure  # noqa: E402

DATA = Path("runs/generalisation/data")
TRAIN = [DATA / "train_babyai.jsonl", DATA / "train_sciworld.jsonl", DATA / "train_textworld.jsonl"]
FIT_CONFIG = "configs/generalisation/tiny_value_rm.yaml"
TEST_CONFIG = "configs/generalisation/test_eval.yaml"
FAMILY_ORDER = ("babyai", "sciworld", "textworld")


def read_groups(paths: list[Path]) -> dict[str, dict[str, list[str]]]:
    """``task type -> episode group -> raw JSON lines`` (main record and branches)."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out[r["task"]][(r.get("meta") or {}).get("group") or r["id"]].append(line)
    return out


def group_states(lines: list[str]) -> int:
    c = TaskCounts()
    for line in lines:
        c.add(json.loads(line))
    return c.labelled_states


def type_order(types: list[str], seed: int) -> list[str]:
    """All task types, families alternating (BabyAI, ScienceWorld, TextWorld, ...), seeded within a family."""
    rng = random.Random(seed)
    per = {f: sorted(t for t in types if t.startswith(f + "/")) for f in FAMILY_ORDER}
    for f in per:
        rng.shuffle(per[f])
    order = []
    while any(per.values()):
        for f in FAMILY_ORDER:
            if per[f]:
                order.append(per[f].pop(0))
    return order


def draw(groups: dict[str, dict[str, list[str]]], types: list[str], budget: int, seed: int) -> tuple[list[str], int]:
    """Whole episode groups from ``types``, an equal share of ``budget`` labelled states each (a type that runs
    out gives its remainder to the others). Returns the lines and the labelled states drawn."""
    rng = random.Random(seed)
    queues = {}
    for t in types:
        g = sorted(groups[t])
        rng.shuffle(g)
        queues[t] = [(groups[t][k], group_states(groups[t][k])) for k in g]
    taken: dict[str, int] = dict.fromkeys(types, 0)
    lines: list[str] = []
    active = list(types)
    while active and sum(taken.values()) < budget:
        share = (budget - sum(taken.values())) / len(active)
        for t in active:
            goal = taken[t] + share
            while queues[t] and taken[t] < goal and sum(taken.values()) < budget:
                rec_lines, n = queues[t].pop(0)
                lines += rec_lines
                taken[t] += n
        active = [t for t in active if queues[t]]
    return lines, sum(taken.values())


def fit(train: Path, out: Path, steps: int) -> tuple[dict[str, float], float]:
    """The tiny value RM on ``train`` for exactly ``steps`` optimiser steps (no early stopping); returns the last
    validation metrics (``val/*`` held-in, ``val_unseen/*`` development) and the wall seconds."""
    import yaml

    from agentrm.fit import main as fit_main
    from agentrm.pipeline import fit_config

    over = {"trainer": {"max_epochs": -1, "max_steps": steps, "enable_progress_bar": False,
                        "check_val_every_n_epoch": 10_000}}  # validated once, after the last step
    cfg = fit_config(FIT_CONFIG, over, out, train)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("EarlyStopping")]
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"].update(monitor=None, save_top_k=1, filename="last-step")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit_config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    cli = fit_main(["--config", str(out / "fit_config.yaml"), "--overwrite", "true"])
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val")}
    return metrics, time.time() - t0


def fit_once(d: Path, lines: list[str], states: int, steps: int) -> dict[str, Any]:
    """Write ``d/train.jsonl`` and fit on it, or reuse the fit ``d/fit_info.json`` records for the same lines and
    step budget (resuming an interrupted run). Returns the record: types, states, records, steps, the training
    set's fingerprint, the fit's wall seconds and its last validation metrics."""
    fingerprint = hashlib.sha256("".join(lines).encode()).hexdigest()[:16]
    info_path = d / "fit_info.json"
    if info_path.exists() and (d / "rm" / "hf_model").exists():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == fingerprint and info.get("steps") == steps:
            return info
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(lines))
    metrics, wall = fit(d / "train.jsonl", d / "rm", steps)
    info = {"types": sorted({json.loads(line)["task"] for line in lines}), "states": states, "records": len(lines),
            "steps": steps, "fingerprint": fingerprint, "fit_wall_s": round(wall, 1), **metrics}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def evaluate(rms: dict[str, Path], out: Path, episodes: int) -> list[dict[str, Any]]:
    """Greedy, Best-of-1 and Best-of-5 per RM on the BabyAI and TextWorld test specs of ``TEST_CONFIG``;
    returns the per-episode rows (``env_set`` replaced by the family, plus ``all``)."""
    import yaml

    from agentrm.search.evaluate import EvalConfig
    from agentrm.search.evaluate import evaluate as run_eval
    from agentrm.search.specs import PolicySpec, ScorerSpec

    test = yaml.safe_load(Path(TEST_CONFIG).read_text())
    held_out = [s for s in test["held_out"] if not s.startswith("sciworld:")]
    run_eval(EvalConfig(
        out_dir=str(out), held_out=held_out, episodes=episodes, seed=test["seed"], train_envs=test["train_envs"],
        train_seed=test["train_seed"], train_episodes=test["train_episodes"],
        policy=PolicySpec(**test["policy"]),
        scorers=[ScorerSpec(kind="value_rm", path=str(p), name=name, batch_size=16) for name, p in rms.items()],
        greedy=True, best_of_n=[1, 5], beam=[], num_threads=1, concurrency=1, progress=False, show=False))
    rows = [json.loads(line) for line in open(out / "episodes.jsonl", encoding="utf-8") if line.strip()]
    return [r for g in by_family(rows).values() for r in g]


def scorer_name(seed: int, k: int) -> str:
    return f"o{seed}k{k}"


def mean_over_orders(rows: list[dict[str, Any]], k: int, seeds: list[int], fam: str, base: str,
                     resamples: int = 2000) -> dict[str, Any] | None:
    """Best-of-5 minus ``base`` (``greedy`` or ``bo1``: each order's own Best-of-1) for ``k`` types, averaged over
    the orders per episode, then over the episodes of ``fam``, with a paired bootstrap interval over episodes."""
    success = {label: by_episode for (env_set, label), by_episode in episode_success(rows).items() if env_set == fam}
    per_episode: dict[tuple[str, int], list[float]] = defaultdict(list)
    for seed in seeds:
        name = scorer_name(seed, k)
        a = success.get(f"best_of_n[{name}]@5", {})
        b = success.get("greedy" if base == "greedy" else f"best_of_n[{name}]@1", {})
        for key in set(a) & set(b):
            per_episode[key].append(a[key] - b[key])
    diffs = [sum(v) / len(v) for key, v in sorted(per_episode.items()) if len(v) == len(seeds)]
    if not diffs:
        return None
    lo, hi = bootstrap_ci(diffs, 0.95, resamples)
    return {"difference": sum(diffs) / len(diffs), "ci_low": lo, "ci_high": hi, "episodes": len(diffs)}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3, 6, 12], help="numbers of training task types")
    ap.add_argument("--states", type=int, default=1500, help="labelled states per training set")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps per fit")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per test spec")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="type orders (each seeds the order within a family and the draw of episode groups)")
    ap.add_argument("--out", type=Path, default=Path("runs/generalisation/scaling"))
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    groups = read_groups(TRAIN)
    info: dict[tuple[int, int], dict[str, Any]] = {}
    rms = {}
    for seed in args.seeds:
        order = type_order(list(groups), seed)
        for k in args.ks:
            if k > len(order):
                raise SystemExit(f"generalisation_scaling: --ks {k}: only {len(order)} task types in the training data")
            d = args.out / f"order{seed}" / f"k{k:02d}"
            lines, states = draw(groups, order[:k], args.states, seed)
            info[(seed, k)] = fit_once(d, lines, states, args.steps)
            rms[scorer_name(seed, k)] = d / "rm" / "hf_model"
            print(f"order {seed}, k={k}: {states} states, fit {info[(seed, k)]['fit_wall_s']:.0f} s", flush=True)
    t0 = time.time()
    rows = evaluate(rms, args.out / "eval", args.episodes)
    eval_wall = time.time() - t0
    comps = paired_comparisons(rows)
    text = table(info, comps, rows, args.seeds) + \
        f"\nevaluation: {eval_wall:.0f} s wall ({args.episodes} episodes per spec)\n"
    print(text)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"info": [{"order": s, "k": k, **i} for (s, k), i in info.items()], "comparisons": comps,
         "eval_wall_s": eval_wall}, indent=2))
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(info, comps, rows, args.seeds, args.png)
    return text


def _cmp(comps: list[dict[str, Any]], seed: int, k: int, fam: str, base: str) -> dict[str, Any] | None:
    name = scorer_name(seed, k)
    base_label = "greedy" if base == "greedy" else f"best_of_n[{name}]@1"
    return next((c for c in comps if c["env_set"] == fam and c["method"] == f"best_of_n[{name}]@5"
                 and c["baseline"] == base_label), None)


def _interval(c: dict[str, Any] | None) -> str:
    return "–" if c is None else f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def table(info: dict[tuple[int, int], dict[str, Any]], comps: list[dict[str, Any]], rows: list[dict[str, Any]],
          seeds: list[int]) -> str:
    fams = [f for f in ("babyai", "textworld", "all") if any(c["env_set"] == f for c in comps)]
    head = "| k types | order | states | val/auroc | val_unseen/auroc | val_unseen/rank_acc | " + " | ".join(
        f"{f}: Bo5 − Bo1 [95% CI] | {f}: Bo5 − greedy" for f in fams) + " |"
    lines = [head, "|---:|---:|---:|---:|---:|---:|" + "---|---|" * len(fams)]
    for k in sorted({k for _, k in info}):
        for seed in seeds:
            i = info[(seed, k)]
            cells = [_interval(_cmp(comps, seed, k, f, base)) for f in fams for base in ("bo1", "greedy")]
            lines.append(f"| {len(i['types'])} | {seed} | {i['states']} | {i.get('val/auroc', float('nan')):.3f} | "
                         f"{i.get('val_unseen/auroc', float('nan')):.3f} | "
                         f"{i.get('val_unseen/rank_acc', float('nan')):.3f} | " + " | ".join(cells) + " |")
        if len(seeds) > 1:
            mean = {m: sum(info[(s, k)].get(m, float("nan")) for s in seeds) / len(seeds)
                    for m in ("val/auroc", "val_unseen/auroc", "val_unseen/rank_acc")}
            cells = [_interval(mean_over_orders(rows, k, seeds, f, base)) for f in fams for base in ("bo1", "greedy")]
            states = round(sum(info[(s, k)]["states"] for s in seeds) / len(seeds))
            lines.append(f"| **{k}** | **mean** | {states} | {mean['val/auroc']:.3f} | {mean['val_unseen/auroc']:.3f} | "
                         f"{mean['val_unseen/rank_acc']:.3f} | " + " | ".join(f"**{c}**" for c in cells) + " |")
    lines.append("")
    lines += [f"- order {s}, k={k}: {', '.join(i['types'])} (fit {i['fit_wall_s']} s)" for (s, k), i in info.items()]
    return "\n".join(lines) + "\n"


def plot(info: dict[tuple[int, int], dict[str, Any]], comps: list[dict[str, Any]], rows: list[dict[str, Any]],
         seeds: list[int], path: Path) -> None:
    """Per family, Best-of-5 − Best-of-1 against ``k``: the mean over orders with its interval (per-order
    differences as small dots), and the mean ``val_unseen/auroc`` on the right axis."""
    ks = sorted({k for _, k in info})
    with figure(path, (6.0, 3.4)) as (_, ax):
        for j, fam in enumerate(("babyai", "textworld", "all")):
            pts = [(k, c) for k in ks if (c := mean_over_orders(rows, k, seeds, fam, "bo1")) is not None]
            if not pts:
                continue
            xs = [k * (1 + 0.04 * (j - 1)) for k, _ in pts]
            ys = [c["difference"] for _, c in pts]
            err = [[c["difference"] - c["ci_low"] for _, c in pts], [c["ci_high"] - c["difference"] for _, c in pts]]
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                               label=f"{fam}: Best-of-5 − Best-of-1" + (" (mean of orders)" if len(seeds) > 1 else ""))
            if len(seeds) > 1:
                dots = [(x, c["difference"]) for x, k in zip(xs, [k for k, _ in pts]) for s in seeds
                        if (c := _cmp(comps, s, k, fam, "bo1")) is not None]
                ax.scatter([x for x, _ in dots], [y for _, y in dots], s=6, alpha=0.4, color=line[0].get_color())
        ax2 = ax.twinx()
        ax2.plot(ks, [sum(info[(s, k)].get("val_unseen/auroc", float("nan")) for s in seeds) / len(seeds) for k in ks],
                 "k--", marker="s", label="val_unseen/auroc (right)")
        ax2.set_ylabel("val_unseen/auroc")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel(f"training task types (fixed ~{info[(seeds[0], ks[0])]['states']} labelled states)")
        ax.set_ylabel("success difference (paired, 95% CI)")
        ax.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="upper right")


if __name__ == "__main__":
    main()
