"""The prefix KV cache stays within its byte budget over a long beam run, side by side with an unbounded cache.

Step-level beam search (W=2, K=4) on long BabyAI episodes (``max_steps=64``; expert policy with error rate
0.7, so beams wander) with the same RM scorer configuration several times: once with a budget that never
evicts (1 TiB) and once per small ``cache_bytes`` budget, each with an entry cap that never binds, so bytes
are the only bound. One scorer per configuration serves every episode, as in ``python -m agentrm.search``,
so the cache carries over between episodes. After every scoring call (one per beam depth) the script
records the bytes the cache holds, recomputed from the storages of the tensors its entries reference
(:meth:`~agentrm.scoring.cache.PrefixCache.storage_nbytes`, not the cache's own running total), and checks
that the running total equals it and stays within the budget (after every store for the bounded runs). It
prints the bytes over time against each budget, and one row per configuration: peak bytes, evictions,
oversized entries, tokens forwarded (a bounded run's extra tokens are evicted prefixes forwarded again),
scoring wall time, and whether the run chose the unbounded run's actions with its scores (it must:
eviction only costs recomputation).

Models: the tiny LLaMA RMs of ``bench/bench_beam_cache.py`` (random weights, fp32, sdpa, ``max_length=1024``;
the implicit PRM scores ``r_t``). torch uses 1 thread.

    python bench/bench_cache_memory.py                          # value RM, budgets 4 MiB and 1 MiB
    python bench/bench_cache_memory.py --scorers value_rm implicit_prm --budgets 4MiB 1MiB
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_beam_cache import Recording, build  # noqa: E402

from agentrm.data.jobs import Job  # noqa: E402
from agentrm.envs.registry import make_env, parse_specs  # noqa: E402
from agentrm.paths import load_tokenizer  # noqa: E402
from agentrm.policies.expert import EnvExpertPolicy  # noqa: E402
from agentrm.scoring.cache import PrefixCache, parse_bytes  # noqa: E402
from agentrm.search.beam import beam_search  # noqa: E402

LONG = ["babyai:GoToObjS6?max_steps=64", "babyai:GoToLocalS6N3?max_steps=64", "babyai:PickupDist?max_steps=64"]
NO_CAP = 10**9  # entries per model: never binds
UNBOUNDED = "1TiB"


class CheckedCache(PrefixCache):
    """A :class:`PrefixCache` that checks its accounting against the tensors it holds (``check``): after every
    store when ``per_store`` (the bounded run), else after every scoring call (the unbounded run: thousands of
    entries make a per-store walk slow)."""

    per_store = True
    violations = 0
    max_held = 0

    def check(self) -> int:
        held = self.storage_nbytes()
        self.max_held = max(self.max_held, held)
        self.violations += held != self.nbytes or held > self.budget
        return held

    def store(self, model, ids, parts):
        stored = super().store(model, ids, parts)
        if self.per_store:
            self.check()
        return stored


class Traced(Recording):
    """:class:`Recording` that also records the cache's bytes (recomputed from its tensors) after every call."""

    def __init__(self, scorer):
        super().__init__(scorer)
        self.trace: list[tuple[int, int, int]] = []  # (bytes held, evictions, tokens forwarded) per call

    def score_candidates_many(self, requests):
        out = super().score_candidates_many(requests)
        c = self.scorer.counters
        self.trace.append((self.scorer.prefix_cache.check(), c.cache_evictions, c.forward_tokens))
        return out


def run(kind: str, tok, budget: str, args) -> dict:
    scorer = build(kind, tok, "cached", cache_bytes=budget, cache_entries=NO_CAP)
    scorer.prefix_cache.__class__ = CheckedCache
    scorer.prefix_cache.per_store = budget != UNBOUNDED
    rec = Traced(scorer)
    actions, depths = [], []
    for spec in parse_specs(args.envs):
        env = make_env(spec)
        for i in range(args.episodes):
            env_seed, policy_seed, _ = Job(spec, i).seeds(args.seed)
            res = beam_search(env, EnvExpertPolicy(0.7, seed=policy_seed), rec, args.width, args.k, env_seed,
                              max_depth=args.max_depth)
            actions.append([s.action for s in res.trajectory.steps])
            depths.append(res.stats["depth"])
        env.close()
    pc, c = scorer.prefix_cache, scorer.counters
    return dict(budget=pc.budget, rec=rec, actions=actions, depths=depths, peak=pc.max_held,
                evictions=c.cache_evictions, oversized=c.cache_oversized, tokens=c.forward_tokens,
                cached=c.cached_tokens, violations=pc.violations, wall=rec.wall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorers", nargs="+", default=["value_rm"], choices=["value_rm", "implicit_prm"])
    ap.add_argument("--envs", nargs="+", default=LONG)
    ap.add_argument("--episodes", type=int, default=2, help="episodes per level")
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-depth", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--budgets", nargs="+", default=["4MiB", "1MiB"], help="the bounded runs' cache_bytes")
    ap.add_argument("--trace-every", type=int, default=32, help="print every N-th call of the trace")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for b in args.budgets:
        parse_bytes(b, "--budgets")
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(str(REPO / "agentrm" / "assets" / "tiny_tokenizer"))
    ok = True
    mib = 2**20
    print(f"beam W={args.width} K={args.k}, {len(args.envs)} levels x {args.episodes} episodes, "
          f"max depth {args.max_depth}, threads={args.threads}")
    for kind in args.scorers:
        t0 = time.perf_counter()
        unbounded = run(kind, tok, UNBOUNDED, args)
        bounded = [run(kind, tok, b, args) for b in args.budgets]
        u = unbounded["rec"]
        print(f"\n{kind}: MiB the cache holds after each scoring call (one call per beam depth; "
              f"{time.perf_counter() - t0:.0f} s in all)")
        head = " | ".join(f"{r['budget'] / mib:g} MiB budget: MiB held / evictions / tokens forwarded" for r in bounded)
        print(f"| call | unbounded: MiB held / tokens forwarded | {head} |")
        print("|---:|---:|" + "---:|" * len(bounded))
        for i in list(range(0, len(u.trace), args.trace_every)) + [len(u.trace) - 1]:
            cells = " | ".join(f"{r['rec'].trace[i][0] / mib:.2f} / {r['rec'].trace[i][1]:,} / {r['rec'].trace[i][2]:,}"
                               for r in bounded)
            print(f"| {i + 1} | {u.trace[i][0] / mib:.2f} / {u.trace[i][2]:,} | {cells} |")
        print("\n| scorer | cache_bytes | peak MiB held | evictions | oversized | tokens forwarded | "
              "prefix tokens from cache | scoring s | same actions, max \\|score diff\\| |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in [unbounded] + bounded:
            diff = max((float((x - y).abs().max()) for x, y in zip(r["rec"].calls, u.calls) if len(x)), default=0.0)
            same = r["actions"] == unbounded["actions"] and len(r["rec"].calls) == len(u.calls)
            budget = "1 TiB (never evicts)" if r is unbounded else f"{r['budget'] / mib:g} MiB"
            print(f"| {kind} | {budget} | {r['peak'] / mib:.2f} | {r['evictions']:,} | {r['oversized']:,} | "
                  f"{r['tokens']:,} | {r['cached']:,} | {r['wall']:.2f} | {same}, {diff:.1e} |")
            ok &= same and diff <= args.atol and r["violations"] == 0 and r["peak"] <= r["budget"]
        for r in bounded:
            print(f"{kind} {r['budget'] / mib:g} MiB: peak {r['peak'] / r['budget']:.2f} of the budget (unbounded peak "
                  f"{unbounded['peak'] / r['budget']:.1f}x it); {r['tokens'] - unbounded['tokens']:,} tokens reforwarded "
                  f"({r['tokens'] / unbounded['tokens']:.2f}x the unbounded run's); accounting violations "
                  f"{r['violations']}")
        depths = unbounded["depths"]
        print(f"episodes: {len(depths)}, beam depth mean {sum(depths) / len(depths):.1f}, max {max(depths)}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
