"""MCTS trees with an LM policy: simulations one at a time vs ``parallel`` in flight with batched ``generate``.

The same trees (BabyAI levels, commit mode, ``--simulations`` per committed step, ``k=3``) are built
with the tiny SFT policy sampled at temperature 1, once with ``parallel=1`` (every expansion and
rollout step is one ``generate`` call) and once per ``--parallel`` value (virtual loss; expansions and
rollout steps of the simulations in flight share left-padded ``generate`` calls, each reply from its
own seeded stream, see :mod:`agentrm.targets.mcts_parallel`). Trees differ between settings (other
simulations, other samples) but each setting is deterministic; the table reports work and time.
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
    ap.add_argument("--simulations", type=int, default=8)
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

    hf.HFPolicy._generate_rows = counted
    print(f"{len(args.envs)} levels x {args.episodes} trees, commit, {args.simulations} simulations per step, k=3")
    print("| parallel | trees | simulations | nodes | env steps | generate calls | rows / call | wall s | simulations / s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for par in [1, *args.parallel]:
        calls.update(n=0, rows=0)
        t0 = time.perf_counter()
        s = build_trees(out=f"{args.out}/trees_p{par}.jsonl", envs=args.envs, episodes=args.episodes,
                        simulations=args.simulations, commit=True, parallel=par, policy=args.policy,
                        overwrite=True, progress=False)
        wall = time.perf_counter() - t0
        rate = s["simulations"] / wall
        base = base or rate
        n_calls = calls["n"] if par > 1 else "(one per reply set)"
        rows = f"{calls['rows'] / calls['n']:.1f}" if par > 1 else "1"
        print(f"| {par} | {s['trees']} | {s['simulations']} | {s['nodes']} | {s['env_steps']:,} | {n_calls} | {rows} | "
              f"{wall:.1f} | {rate:.2f} | {rate / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
