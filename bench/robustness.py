"""Robustness to rephrased instructions (the paper's perturbation study), at laptop scale.

Every evaluation episode is played five times: with BabyAI's own mission text and with each of the
four rewrites of :data:`agentrm.envs.babyai.REPHRASINGS` (verbs; object names; both; sentence form;
spec option ``rephrase=1..4``).  The episodes (seeds, layouts) are identical across variants, so the
drop of each method is a paired difference.  Greedy and Best-of-5 guided by the value RM, held-in
and held-out levels.  Writes ``results.md``, ``results.json`` and ``robustness.png`` under ``--out``.

The scripted agent acts on the environment's state, not on the text, so with ``--policy expert``
(default) only the reward model reads the rewritten instruction: the greedy row cannot drop and the
Best-of-5 row measures the RM's robustness alone.  ``--policy <HF dir>`` (e.g. the tiny SFT policy)
puts an LM policy, which does read it, in the loop.

    python bench/robustness.py                          # 3 min (scripted policy); 12 min with --policy <SFT dir> --episodes 6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentrm.envs.babyai import REPHRASINGS, rephrase_mission  # noqa: E402
from bench.paper_common import HELD_IN, HELD_OUT, figure  # noqa: E402

NAMES = ["original", "verbs", "object names", "verbs + objects", "sentence form"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rm", default="runs/pipeline_tiny/rm/hf_model", help="value RM (default: the pipeline's)")
    ap.add_argument("--policy", default="expert", help="'expert' (scripted, error rate) or an HF policy dir")
    ap.add_argument("--error_rate", type=float, default=0.6)
    ap.add_argument("--episodes", type=int, default=12, help="episodes per level and variant")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--out", default="runs/paper/robustness")
    args = ap.parse_args(argv)

    from agentrm.search.evaluate import EvalConfig, evaluate
    from agentrm.search.specs import PolicySpec, ScorerSpec

    policy = (
        PolicySpec(kind="expert", error_rate=args.error_rate)
        if args.policy == "expert"
        else PolicySpec(kind="hf", model=args.policy, prompt="plain", temperature=1.0, max_new_tokens=8)
    )
    out = Path(args.out)
    results: dict[str, dict] = {}
    for v in range(len(REPHRASINGS) + 1):
        opt = f"&rephrase={v}" if v else ""
        rows = evaluate(EvalConfig(
            out_dir=str(out / f"variant{v}"),
            held_in=[f"babyai:{lv}?max_steps=24{opt}" for lv in HELD_IN],
            held_out=[f"babyai:{lv}?max_steps=24{opt}" for lv in HELD_OUT],
            train_envs=[f"babyai:{lv}?max_steps=24" for lv in HELD_IN],
            episodes=args.episodes,
            seed=3000,
            train_seed=0,
            train_episodes=200,
            policy=policy,
            scorers=[ScorerSpec(path=args.rm, name="value_rm", max_length=1024)],
            greedy=True,
            best_of_n=[args.n],
            beam=[],
            num_threads=1,
            progress=False,
            show=False,
        ))
        results[NAMES[v]] = {
            f"{r['env_set']}/{r['method']}": round(r["success_rate"], 4)
            for r in rows
            if r["method"] in ("greedy", "best_of_n")
        }
        print(NAMES[v], results[NAMES[v]], flush=True)
    keys = [("held_in", "greedy"), ("held_in", "best_of_n"), ("held_out", "greedy"), ("held_out", "best_of_n")]
    base = results["original"]
    example = "go to the red ball"
    lines = [
        f"Success with each instruction variant ({args.episodes} episodes per level and variant, same episodes "
        f"in every variant; policy {args.policy}"
        + (f" with error rate {args.error_rate}" if args.policy == "expert" else "")
        + f"; Best-of-{args.n} by the value RM `{args.rm}`; `python bench/robustness.py`).",
        "",
        "| variant | e.g. | held-in greedy | held-in Best-of-N | held-out greedy | held-out Best-of-N |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for v, name in enumerate(NAMES):
        r = results[name]
        cells = [f"{r[f'{s}/{m}']:.3f}" + ("" if not v else f" ({r[f'{s}/{m}'] - base[f'{s}/{m}']:+.3f})")
                 for s, m in keys]
        lines.append(f"| {name} | {rephrase_mission(example, v)} | " + " | ".join(cells) + " |")
    mean_drop = {
        f"{s}/{m}": sum(results[n][f"{s}/{m}"] - base[f"{s}/{m}"] for n in NAMES[1:]) / (len(NAMES) - 1)
        for s, m in keys
    }
    lines.append("| mean change over the 4 rewrites | | " + " | ".join(f"{mean_drop[f'{s}/{m}']:+.3f}" for s, m in keys) + " |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "success": results, "mean_change": mean_drop}, indent=2))

    with figure(out / "robustness.png", (7.5, 3.8)) as (fig, ax):
        for i, (s, m) in enumerate(keys):
            xs = [j + (i - 1.5) * 0.2 for j in range(len(NAMES))]
            ax.bar(xs, [results[n][f"{s}/{m}"] for n in NAMES], width=0.2, label=f"{s} {m}")
        ax.set_xticks(range(len(NAMES)), NAMES, fontsize=8)
        ax.set_ylabel("success rate")
        ax.set_ylim(0, 1.05)
        ax.set_title("robustness to rephrased instructions")
        ax.legend(fontsize=7, loc="lower right")
    print(table)
    return results


if __name__ == "__main__":
    main()
