"""Beam search W=2, K=4 on the BabyAI held-out levels: prefix-cached vs packed RM scoring, side by side.

For every episode the same beam search (same env seed, same policy seed) runs twice, once with each
scoring path of the same model; the script checks that both choose the same actions and that every
scoring call's scores agree within ``--atol``, and reports per episode the RM tokens forwarded and the
wall time spent inside ``score_candidates``. Policy: each level's expert with error rate 0.7 (as
``configs/search/babyai_eval.yaml``), episodes capped at 24 steps, evaluation seeds from base 1000.
Models: the tiny LLaMA value RM / implicit PRM of ``configs/tiny`` (hidden 128, 4 layers) and a ``mid``
one (hidden 512, 8 layers), random weights and the shipped tiny tokenizer, fp32, sdpa, ``max_length=1024``; torch uses 1 thread.

    python bench/bench_beam_cache.py                         # value RM, 5 levels x 4 episodes
    python bench/bench_beam_cache.py --scorers value_rm implicit_prm --models tiny mid --episodes 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentrm.data.jobs import Job  # noqa: E402
from agentrm.envs.registry import make_env, parse_specs  # noqa: E402
from agentrm.models.backbone import build_backbone  # noqa: E402
from agentrm.models.implicit_prm import ImplicitPRM  # noqa: E402
from agentrm.models.value_rm import ValueRewardModel  # noqa: E402
from agentrm.paths import load_tokenizer  # noqa: E402
from agentrm.policies.expert import EnvExpertPolicy  # noqa: E402
from agentrm.scoring import ImplicitPRMScorer, ValueRMScorer  # noqa: E402
from agentrm.search.beam import beam_search  # noqa: E402

HELD_OUT = [
    "babyai:GoToRedBallGrey?max_steps=24", "babyai:GoToRedBlueBall?max_steps=24", "babyai:GoToObjS6?max_steps=24",
    "babyai:GoToLocalS6N3?max_steps=24", "babyai:PickupDist?max_steps=24",
]
TINY = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048)
MODELS = {  # tiny = configs/tiny; mid = bench_scoring.py's mid (hidden 512, 8 layers)
    "tiny": TINY,
    "mid": {**TINY, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 8},
}


class Recording:
    """Wraps a scorer: records every ``score_candidates`` result and the wall time spent in it."""

    def __init__(self, scorer):
        self.scorer, self.calls, self.wall = scorer, [], 0.0
        self.counters = scorer.counters
        self.outcome_blind = scorer.outcome_blind

    def score_candidates(self, prefix, candidates):
        t0 = time.perf_counter()
        out = self.scorer.score_candidates(prefix, candidates)
        self.wall += time.perf_counter() - t0
        self.calls.append(out.clone())
        return out

    def score_candidates_many(self, requests):
        t0 = time.perf_counter()
        out = self.scorer.score_candidates_many(requests)
        self.wall += time.perf_counter() - t0
        self.calls.extend(o.clone() for o in out)
        return out

    def score_trajectories(self, trajs):
        return self.scorer.score_trajectories(trajs)


def build(kind: str, tok, path: str, size: str = "tiny", **cache):
    """A scorer of ``kind`` on a random-weight ``size`` model; ``cache``: ``cache_bytes`` / ``cache_entries``."""
    config = MODELS[size]
    torch.manual_seed(0)
    if kind == "value_rm":
        model = ValueRewardModel(build_backbone(config=config, vocab_size=len(tok), attn_implementation="sdpa"))
        torch.nn.init.normal_(model.value_head.weight, std=1.0)
        return ValueRMScorer(model.eval(), tok, max_length=1024, path=path, **cache)
    policy = build_backbone(config=config, vocab_size=len(tok), causal_lm=True, attn_implementation="sdpa")
    prm = ImplicitPRM(policy, beta=0.5)
    with torch.no_grad():
        for p in prm.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # r_t: the cache holds no prefix rewards
    return ImplicitPRMScorer(prm, tok, max_length=1024, path=path, include_prefix=False, **cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorers", nargs="+", default=["value_rm"], choices=["value_rm", "implicit_prm"])
    ap.add_argument("--envs", nargs="+", default=HELD_OUT)
    ap.add_argument("--episodes", type=int, default=4, help="episodes per level")
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["tiny"], choices=sorted(MODELS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(str(REPO / "agentrm" / "assets" / "tiny_tokenizer"))
    specs = parse_specs(args.envs)
    ok = True
    print(f"beam W={args.width} K={args.k}, {len(specs)} levels x {args.episodes} episodes, threads={args.threads}")
    print("| model | scorer | path | tokens forwarded / episode | cached tokens / episode | scoring s / episode | forward passes / episode |")
    print("|---|---|---|---:|---:|---:|---:|")
    for size, kind in [(m, s) for m in args.models for s in args.scorers]:
        scorers = {p: build(kind, tok, p, size) for p in ("packed", "cached")}
        totals = {p: {"tokens": 0, "cached": 0, "wall": 0.0, "passes": 0} for p in scorers}
        max_diff, same_actions, n = 0.0, 0, 0
        for spec in specs:
            env = make_env(spec)
            for i in range(args.episodes):
                env_seed, policy_seed, _ = Job(spec, i).seeds(args.seed)
                runs = {}
                for path, scorer in scorers.items():
                    rec = Recording(scorer)
                    res = beam_search(env, EnvExpertPolicy(0.7, seed=policy_seed), rec, args.width, args.k, env_seed)
                    runs[path] = (res, rec)
                    t = totals[path]
                    t["tokens"] += res.stats["tokens_scored"]
                    t["cached"] += res.stats["cached_tokens"]
                    t["passes"] += res.stats["forward_passes"]
                    t["wall"] += rec.wall
                (rp, cp), (rc, cc) = runs["packed"], runs["cached"]
                same = [s.action for s in rp.trajectory.steps] == [s.action for s in rc.trajectory.steps]
                same_actions += same
                n += 1
                if len(cp.calls) != len(cc.calls):
                    ok = False
                for a, b in zip(cp.calls, cc.calls):
                    max_diff = max(max_diff, float((a - b).abs().max()) if len(a) else 0.0)
            env.close()
        for path, t in totals.items():
            print(f"| {size} | {kind} | {path} | {t['tokens'] / n:,.0f} | {t['cached'] / n:,.0f} | {t['wall'] / n:.3f} | "
                  f"{t['passes'] / n:.1f} |")
        tp, tc = totals["packed"], totals["cached"]
        print(f"{size} {kind}: tokens {tp['tokens'] / tc['tokens']:.2f}x fewer, scoring wall {tp['wall'] / tc['wall']:.2f}x "
              f"less; same chosen actions in {same_actions}/{n} episodes; max |score diff| {max_diff:.2e}")
        ok &= same_actions == n and max_diff <= args.atol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
