"""Batched policy calls with an LM policy: ``generate`` per reply vs batched; evaluation episodes one at a
time vs several at once; MCTS simulations one at a time vs ``parallel`` in flight.

Evaluation: the harness plays the same episodes (greedy and Best-of-4 by the oracle, a timing run) with
``concurrency`` 1 and 4; with ``batch_requests`` the concurrently running episodes' replies share
``generate`` calls (:class:`~agentrm.policies.batcher.GenerateBatcher`) and the summaries must be equal.

MCTS: the same trees (BabyAI levels, ``--simulations`` from the first state, ``k=3``) are built
with the tiny SFT policy sampled at temperature 1, once with ``parallel=1`` (every expansion and
rollout step is one ``generate`` call) and once per ``--parallel`` value (virtual loss; expansions and
rollout steps of the simulations in flight share left-padded ``generate`` calls, each reply from its
own seeded stream, see :mod:`agentrm.targets.mcts_parallel`). Trees differ between settings (other
simulations, other samples) but each setting is deterministic; the table reports the work (environment
steps: one policy reply per rollout step, ``k`` per expansion) and its rate.
torch uses 1 thread.

    OMP_NUM_THREADS=1 python -m agentrm.fit --config configs/tiny/policy_sft.yaml   # the policy (once)
    python bench/bench_policy_batching.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentrm.search.specs import PolicySpec  # noqa: E402
from agentrm.trees import TreesConfig, build_trees  # noqa: E402


def evaluation(args) -> None:
    """Episodes per minute of the harness with 1 and 4 episodes at once (replies batched across episodes)."""
    from agentrm.search.evaluate import EvalConfig, evaluate
    from agentrm.search.specs import PolicySpec, ScorerSpec

    policy = PolicySpec(kind="hf", model=args.policy, temperature=1.0, max_new_tokens=16, batch_requests=True,
                        batch_size=32)
    n = 2 * args.eval_episodes
    print()
    print(f"evaluation: {n} BabyAI episodes (GoToRedBall / GoToRedBallGrey, max_steps 16), greedy + Best-of-4")
    print("| episodes at once | wall s | episodes / min | speed-up | same summary |")
    print("|---:|---:|---:|---:|---|")
    base, first = None, None
    for c in (1, 4):
        t0 = time.perf_counter()
        summary = evaluate(EvalConfig(out_dir=f"{args.out}/eval_c{c}", held_in=["babyai:GoToRedBall?max_steps=16"],
                           held_out=["babyai:GoToRedBallGrey?max_steps=16"], episodes=args.eval_episodes,
                           policy=policy, scorers=[ScorerSpec(kind="oracle")], greedy=True, best_of_n=[4], beam=[],
                           concurrency=c, num_threads=1, progress=False, show=False, resume=False))
        wall = time.perf_counter() - t0
        table = [{k: v for k, v in r.items() if k != "wall_s"} for r in summary]
        first = first or table
        base = base or wall
        print(f"| {c} | {wall:.1f} | {n / wall * 60:.1f} | {base / wall:.2f}x | {table == first} |", flush=True)
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="runs/tiny_policy_sft/hf_model")
    ap.add_argument("--envs", nargs="+", default=["babyai:GoToRedBall?max_steps=16", "babyai:GoToLocal?max_steps=16"])
    ap.add_argument("--episodes", type=int, default=2, help="trees per level")
    ap.add_argument("--simulations", type=int, default=32)
    ap.add_argument("--commit", action="store_true", help="search while acting (simulations per committed step)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--out", default="runs/bench/policy_batching")
    ap.add_argument("--eval_episodes", type=int, default=4, help="evaluation episodes per level (2 levels)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from agentrm.policies import hf

    calls = {"n": 0, "rows": 0}
    generate = hf.HFPolicy._generate_rows

    def counted(self, rows, temp, device):
        calls["n"] += 1
        calls["rows"] += len(rows)
        return generate(self, rows, temp, device)

    lm = hf.load_hf_policy(args.policy)
    msgs = [(f"Mission: go to the red ball.\nFacing east. Red ball {i + 2} ahead.", "move forward") for i in range(8)]
    msgs = [[{"role": "user", "content": m}, {"role": "assistant", "content": a}, {"role": "user", "content": "Facing east."}]
            for m, a in msgs]
    print("batched generate, the same prompts (temperature 1, 16 new tokens at most):")
    print("| rows | ms / reply, one call per reply | ms / reply, one batched call | ratio |")
    print("|---:|---:|---:|---:|")
    for rows in (1, 4, 8):
        per = {}
        for batched in (False, True):
            pol = hf.HFPolicy(lm.model, lm.tokenizer, temperature=1.0, max_new_tokens=16, batch_requests=batched)
            t0 = time.perf_counter()
            for _ in range(5):
                pol.chat_many([(m, 1) for m in msgs[:rows]])
            per[batched] = (time.perf_counter() - t0) / 5 / rows * 1e3
        print(f"| {rows} | {per[False]:.1f} | {per[True]:.1f} | {per[False] / per[True]:.2f}x |")
    evaluation(args)
    hf.HFPolicy._generate_rows = counted
    mode = "commit, per step" if args.commit else "from the first state"
    print(f"{len(args.envs)} levels x {args.episodes} trees, {args.simulations} simulations ({mode}), k=3")
    print("| parallel | trees | simulations | nodes | env steps | generate calls | rows / call | wall s | env steps / s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print()
    base = None
    for par in [1, *args.parallel]:
        calls.update(n=0, rows=0)
        t0 = time.perf_counter()
        s = build_trees(TreesConfig(out=f"{args.out}/trees_p{par}.jsonl", envs=args.envs, episodes=args.episodes,
                                    simulations=args.simulations, commit=args.commit, parallel=par,
                                    policy=PolicySpec(kind="hf", model=args.policy, max_new_tokens=16),
                                    overwrite=True, progress=False))
        wall = time.perf_counter() - t0
        rate = s["env_steps"] / wall
        base = base or rate
        n_calls = calls["n"] if par > 1 else "(one per reply set)"
        rows = f"{calls['rows'] / calls['n']:.1f}" if par > 1 else "1"
        print(f"| {par} | {s['trees']} | {s['simulations']} | {s['nodes']} | {s['env_steps']:,} | {n_calls} | {rows} | "
              f"{wall:.1f} | {rate:.2f} | {rate / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
