"""Value targets at an equal environment-step budget: Monte-Carlo vs MCTS vs TD(λ).

For the same budget of environment steps (every ``env.step`` counted, including rollouts
and tree descents), with the same noisy scripted BabyAI policy:

* **MC**: the collector's episodes with ``mc_rollouts`` rollouts per step value and one
  sibling branch per episode, until the budget is spent;
* **MCTS**: one tree per task instance (``simulations`` each), flattened with
  :func:`agentrm.targets.mcts.flatten_tree`, until the budget is spent;
* **TD(λ)**: the MC records relabelled with λ-returns bootstrapped from the RM trained on
  MC (no extra env steps; it costs one more training run).

A tiny value RM is trained on each (same backbone, seed and number of optimiser steps)
and scored on the same held-out episodes (other seeds; real outcomes): step AUROC
(every step's value vs the episode's success) and last-step AUROC.  If
:mod:`agentrm.search` is importable, Best-of-N with each RM is evaluated too (gain =
Best-of-N success minus mean sample success).

    python bench/study_targets.py --budget 20000 --steps 150
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentrm.data.jobs import Job  # noqa: E402
from agentrm.data.schema import Trajectory, write_jsonl  # noqa: E402
from agentrm.envs.babyai import BabyAITextEnv  # noqa: E402
from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy  # noqa: E402
from agentrm.envs.registry import EnvSpec  # noqa: E402
from agentrm.targets.mcts import MCTS, MCTSConfig, flatten_tree  # noqa: E402
from agentrm.targets.monte_carlo import run_episode  # noqa: E402

BACKBONE = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}


class CountingEnv(BabyAITextEnv):
    """BabyAI env counting every ``step`` in a counter shared by all its clones."""

    def __init__(self, *a, counter: list[int], **kw):
        super().__init__(*a, **kw)
        self.counter = counter

    def step(self, action: str):
        self.counter[0] += 1
        return super().step(action)


def _jobs(levels: list[str]):
    i = 0
    while True:
        for lv in levels:
            yield Job(EnvSpec("babyai", lv), i)
        i += 1


def collect_mc(levels, budget, error_rate, rollouts, max_steps, seed) -> tuple[list[Trajectory], int]:
    counter = [0]
    envs = {lv: CountingEnv(lv, max_steps=max_steps, counter=counter) for lv in levels}
    out: list[Trajectory] = []
    for job in _jobs(levels):
        if counter[0] >= budget:
            break
        env_seed, pol_seed, br_seed = job.seeds(seed)
        out += run_episode(
            envs[job.spec.task],
            ScriptedBabyAIPolicy(error_rate, seed=pol_seed),
            env_seed,
            episode_id=job.episode_id(seed),
            task=f"babyai/{job.spec.task}",
            rollouts=rollouts,
            siblings=1,
            branch_seed=br_seed,
        )
    return out, counter[0]


def collect_mcts(
    levels, budget, error_rate, sims, k, c, max_steps, seed
) -> tuple[list[Trajectory], int, int]:
    counter = [0]
    envs = {lv: CountingEnv(lv, max_steps=max_steps, counter=counter) for lv in levels}
    out: list[Trajectory] = []
    trees = 0
    for job in _jobs(levels):
        if counter[0] >= budget:
            break
        env_seed, pol_seed, s_seed = job.seeds(seed)
        m = MCTS(
            ScriptedBabyAIPolicy(error_rate, seed=pol_seed),
            MCTSConfig(sims, k, c, max_steps or 64),
            seed=s_seed,
        )
        tree = m.search(envs[job.spec.task], env_seed, tree_id=job.episode_id(seed), task=f"babyai/{job.spec.task}")
        out += flatten_tree(tree)
        trees += 1
    return out, counter[0], trees


def held_out(levels, episodes, error_rate, max_steps, seed) -> list[Trajectory]:
    out = []
    for lv in levels:
        env = BabyAITextEnv(lv, max_steps=max_steps)
        for i in range(episodes):
            env_seed, pol_seed, _ = Job(EnvSpec("babyai", lv), i).seeds(seed)
            out += run_episode(
                env,
                ScriptedBabyAIPolicy(error_rate, seed=pol_seed),
                env_seed,
                episode_id=Job(EnvSpec("babyai", lv), i).episode_id(seed),
                task=f"babyai/{lv}",
                rollouts=0,
            )
    return out


def train_rm(train: Path, val: Path, out: Path, steps: int, seed: int = 0) -> dict[str, float]:
    """A short value-RM run; returns the final validation metrics and the export dir."""
    import lightning as L

    from agentrm.lit.datamodule import TrajectoryDataModule
    from agentrm.lit.value_module import ValueRMModule

    L.seed_everything(seed, verbose=False)
    dm = TrajectoryDataModule(str(train), str(val), max_length=512, batch_size=8)
    model = ValueRMModule(backbone_config=BACKBONE, learning_rate=2e-3, warmup_steps=20)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=None,
        check_val_every_n_epoch=10**6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    trainer.validate(model, datamodule=dm, verbose=False)
    model.export(out)
    return {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", nargs="+", default=["GoToRedBall", "GoToLocal"])
    ap.add_argument("--budget", type=int, default=20000, help="env steps per target type")
    ap.add_argument("--error_rate", type=float, default=0.5)
    ap.add_argument("--max_steps", type=int, default=24)
    ap.add_argument("--mc_rollouts", type=int, default=4)
    ap.add_argument("--simulations", type=int, default=40)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--c", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.8)
    ap.add_argument("--held_out", type=int, default=30, help="held-out episodes per level")
    ap.add_argument("--steps", type=int, default=150, help="optimiser steps per RM")
    ap.add_argument("--bon_episodes", type=int, default=5, help="Best-of-N episodes per level (0 skips)")
    ap.add_argument("--out", default="runs/study_targets")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mc, mc_steps = collect_mc(args.levels, args.budget, args.error_rate, args.mc_rollouts, args.max_steps, 0)
    t_mc = time.perf_counter() - t0
    t0 = time.perf_counter()
    mcts, mcts_steps, n_trees = collect_mcts(
        args.levels, args.budget, args.error_rate, args.simulations, args.k, args.c, args.max_steps, 0
    )
    t_mcts = time.perf_counter() - t0
    held = held_out(args.levels, args.held_out, args.error_rate, args.max_steps, 777)
    for name, data in (("mc", mc), ("mcts", mcts), ("held", held)):
        write_jsonl(out / f"{name}.jsonl", data)
    info = {
        "mc": {
            "env_steps": mc_steps,
            "records": len(mc),
            "episodes": sum("branch_at" not in t.meta for t in mc),
            "collect_s": round(t_mc, 1),
        },
        "mcts": {
            "env_steps": mcts_steps,
            "records": len(mcts),
            "trees": n_trees,
            "collect_s": round(t_mcts, 1),
        },
    }
    info["mc"].update(train_rm(out / "mc.jsonl", out / "held.jsonl", out / "rm_mc", args.steps))
    info["mcts"].update(train_rm(out / "mcts.jsonl", out / "held.jsonl", out / "rm_mcts", args.steps))

    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer
    from agentrm.targets.td_lambda import td_lambda_targets, value_model_fn

    tok = load_tokenizer(str(out / "rm_mc"))
    vfn = value_model_fn(ValueRewardModel.from_pretrained(out / "rm_mc"), tok, max_length=512)
    write_jsonl(out / "td.jsonl", td_lambda_targets(mc, vfn, lam=args.lam))
    info["td"] = {"env_steps": mc_steps, "records": len(mc), "lambda": args.lam}
    info["td"].update(train_rm(out / "td.jsonl", out / "held.jsonl", out / "rm_td", args.steps))

    try:
        from agentrm.search.evaluate import evaluate
        from agentrm.search.specs import PolicySpec, ScorerSpec
    except ImportError:
        evaluate = None
        print("agentrm.search not available: AUROC only")
    if evaluate is not None and args.bon_episodes:
        rows = evaluate(
            out_dir=str(out / "bon"),
            held_in=args.levels,
            held_out=[],
            episodes=args.bon_episodes,
            seed=1000,
            max_steps=args.max_steps,
            policy=PolicySpec(kind="scripted", error_rate=0.7),
            scorers=[ScorerSpec(path=str(out / f"rm_{n}"), name=n) for n in ("mc", "mcts", "td")],
            greedy=False,
            best_of_n=[4],
            beam=[],
            num_threads=args.threads,
            progress=False,
            show=False,
        )
        base = next(r["success_rate"] for r in rows if r["method"] == "sampling")
        for r in rows:
            if r["method"] == "best_of_n":
                info[r["scorer"]]["bo4_success"] = round(r["success_rate"], 3)
                info[r["scorer"]]["bo4_gain"] = round(r["success_rate"] - base, 3)
        info["sampling_success"] = round(base, 3)

    print(
        f"\nheld-out: {len(held)} episodes ({args.held_out}/level, error rate {args.error_rate}); "
        f"budget {args.budget} env steps per target type; {args.steps} optimiser steps per RM"
    )
    print(
        f"{'target':6s} {'env_steps':>9s} {'records':>7s} {'val/auroc':>9s} {'traj_auroc':>10s} "
        f"{'rank_acc':>8s} {'Bo4 gain':>8s}"
    )
    for name in ("mc", "mcts", "td"):
        r = info[name]
        print(
            f"{name:6s} {r['env_steps']:9d} {r['records']:7d} {r.get('val/auroc', float('nan')):9.4f} "
            f"{r.get('val/traj_auroc', float('nan')):10.4f} {r.get('val/rank_acc', float('nan')):8.4f} "
            f"{r.get('bo4_gain', float('nan')):8.3f}"
        )
    (out / "results.json").write_text(json.dumps({"args": vars(args), **info}, indent=2))
    return info


if __name__ == "__main__":
    main()
