"""Memory the prefix KV cache keeps alive with its default settings, after each beam-search episode.

Beam W=2, K=4 on three BabyAI held-out levels (GoToRedBallGrey, GoToRedBlueBall, GoToObjS6; max_steps 24),
2 episodes each, expert policy with error rate 0.7, seeds from base 1000; one cached scorer per model serves
every episode (as in ``python -m agentrm.search``); models of ``bench/bench_beam_cache.py`` (random weights,
fp32, sdpa), default cache settings (64 entries per model; the byte budget's default where there is one).
"Held" is the bytes of the distinct tensor storages the cache's entries keep alive: ``storage_nbytes()``
where the cache has it, else its ``nbytes`` (before the byte budget: the distinct batched tensors its
entries were views of).

It imports ``agentrm`` and ``bench_beam_cache`` from ``--tree`` (default: this checkout), so an older
commit can be measured the same way, e.g. the cache before it owned its memory::

    git worktree add /tmp/agentrm-e4286ed e4286ed
    python bench/bench_cache_held.py --tree /tmp/agentrm-e4286ed --models tiny mid
    python bench/bench_cache_held.py --models tiny mid
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(REPO), help="checkout to import agentrm and bench_beam_cache from")
    ap.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "mid"])
    ap.add_argument("--scorers", nargs="+", default=["value_rm", "implicit_prm"], choices=["value_rm", "implicit_prm"])
    ap.add_argument("--episodes", type=int, default=2, help="episodes per level")
    args = ap.parse_args(argv)
    tree = Path(args.tree).resolve()
    sys.path[:0] = [str(tree), str(tree / "bench")]
    import torch
    from bench_beam_cache import HELD_OUT, Recording, build

    from agentrm.data.jobs import Job
    from agentrm.envs.registry import make_env, parse_specs
    from agentrm.paths import load_tokenizer
    from agentrm.policies.expert import EnvExpertPolicy
    from agentrm.search.beam import beam_search

    torch.set_num_threads(1)
    tok = load_tokenizer(str(tree / "agentrm" / "assets" / "tiny_tokenizer"))
    print(f"tree {tree}")
    print("| model | scorer | entries | MiB held after each episode | max MiB |")
    print("|---|---|---:|---|---:|")
    for size in args.models:
        for kind in args.scorers:
            scorer = build(kind, tok, "cached", size)
            cache, held = scorer.prefix_cache, []
            for spec in parse_specs(HELD_OUT[:3]):
                env = make_env(spec)
                for i in range(args.episodes):
                    env_seed, policy_seed, _ = Job(spec, i).seeds(1000)
                    beam_search(env, EnvExpertPolicy(0.7, seed=policy_seed), Recording(scorer), 2, 4, env_seed)
                    nbytes = cache.storage_nbytes() if hasattr(cache, "storage_nbytes") else cache.nbytes
                    held.append(nbytes / 2**20)
                env.close()
            print(f"| {size} | {kind} | {len(cache)} | {' '.join(f'{h:.1f}' for h in held)} | {max(held):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
