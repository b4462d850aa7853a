"""MCTS trees with an LM policy: simulations one at a time vs ``parallel`` in flight with batched ``generate``.

The same trees (BabyAI levels, ``--simulations`` from the first state, ``k=3``) are built
with the tiny SFT policy sampled at temperature 1, once with ``parallel=1`` (every expansion and
rollout step is one ``generate`` call) and once per ``--parallel`` value (virtual loss; expansions and
rollout steps of the simulations in flight share left-padded ``generate`` calls, each reply from its
own seeded stream, see :mod:`agentrm.targets.mcts_parallel`). Trees differ between settings (other
simulations, other samples) but each setting is deterministic; the table reports the work (environment
steps: one policy reply per rollout step, ``k`` per expansion) and its rate.
torch uses 1 thread.

    OMP_NUM_THREADS=1 python -m agentrm.fit --config configs/tiny/policy_sft.yaml   # the policy (once)
    python bench/bench_tree_batching.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentrm.trees import build_trees  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="runs/tiny_policy_sft/hf_model")
    ap.add_argument("--envs", nargs="+", default=["babyai:GoToRedBall?max_steps=16", "babyai:GoToLocal?max_steps=16"])
    ap.add_argument("--episodes", type=int, default=2, help="trees per level")
    ap.add_argument("--simulations", type=int, default=32)
    ap.add_argument("--commit", action="store_true", help="search while acting (simulations per committed step)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--out", default="runs/bench/tree_batching")
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
        s = build_trees(out=f"{args.out}/trees_p{par}.jsonl", envs=args.envs, episodes=args.episodes,
                        simulations=args.simulations, commit=args.commit, parallel=par, policy=args.policy,
                        overwrite=True, progress=False)
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
