"""Packed candidate scoring vs one forward per candidate (value RM and implicit PRM).

Shape: a prefix of ``--prefix`` tokens (default 1024) and ``--k`` candidates (default 8) of ``--cand``
tokens each (default 64, through the end-of-turn token), fp32. Three ways of scoring the same tokens:

* ``packed``: :meth:`agentrm.scoring.ValueRMScorer.score_candidates` (``pack=True``), end to end:
  tokenisation + one forward of ``P + K*L`` tokens with the 4D block mask (two for the PRM);
* ``plain``: the same scorer with ``pack=False``: one padded batch of ``K`` rows ``prefix + cand_k``;
* ``per-candidate``: the models' ordinary ``score`` path, one causal forward of ``P + L`` tokens per
  candidate (tokens prepared beforehand, so tokenisation is not timed here).

Each timing is the median of ``--repeats`` runs after one warm-up, the three ways timed round-robin (``time.perf_counter``, default
``torch`` threads). ``max |diff|`` compares packed with per-candidate scores. A table goes to stdout
and rows are appended to ``bench/results/scoring.csv`` with device, versions and git commit.

    python bench/bench_scoring.py                       # tiny and mid configs
    python bench/bench_scoring.py --models tiny --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentrm.data.schema import Step, Trajectory, read_jsonl  # noqa: E402
from agentrm.data.tiny_tokenizer import train_tiny_tokenizer, trajectory_texts  # noqa: E402
from agentrm.models.backbone import build_backbone  # noqa: E402
from agentrm.models.implicit_prm import ImplicitPRM  # noqa: E402
from agentrm.models.value_rm import ValueRewardModel  # noqa: E402
from agentrm.scoring import ImplicitPRMScorer, ValueRMScorer, tokenize_candidates  # noqa: E402

DEFAULT_CSV = REPO / "bench" / "results" / "scoring.csv"
SAMPLE = REPO / "agentrm" / "assets" / "babyai_sample.jsonl"
BASE = {
    "model_type": "llama",
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
CONFIGS = {  # tiny = configs/tiny/value_rm.yaml backbone_config
    "tiny": {
        **BASE,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "mid": {
        **BASE,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
}
FIELDS = [
    "timestamp",
    "device",
    "torch",
    "transformers",
    "commit",
    "model",
    "scorer",
    "attn",
    "prefix_tokens",
    "k",
    "cand_tokens_mean",
    "packed_ms",
    "plain_ms",
    "per_candidate_ms",
    "speedup",
    "max_abs_diff",
    "threads",
    "repeats",
]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


OBSERVATION = "Facing east. Wall 2 ahead. Red ball 1 ahead 1 left."


def make_inputs(tok, prefix_tokens: int, k: int, cand_tokens: int) -> tuple[Trajectory, list[Step]]:
    """A BabyAI prefix trajectory and ``k`` distinct candidate steps near the requested token counts.

    A candidate is an action plus the observation it led to (the value RM reads the value at
    the observation's end; the implicit PRM scores the action tokens only).

    The prefix is grown step by step past ``prefix_tokens`` and then cut to exactly that many tokens by
    :func:`tokenize_candidates`'s left truncation (``max_length``), so both paths score the same tokens.
    """
    trajs = read_jsonl(SAMPLE)
    steps = [s for t in trajs for s in t.steps]
    prefix = Trajectory("bench", trajs[0].task, trajs[0].instruction, [], 0.0, False)
    i = 0
    while len(tokenize_candidates(tok, prefix, ["x"]).prefix_ids) < prefix_tokens + 200:
        prefix.steps.append(Step(steps[i % len(steps)].action, steps[i % len(steps)].observation))
        i += 1
    words = " ".join(s.observation for s in steps[:400]).split()
    cands = []
    for j in range(k):
        n, text = 8, ""
        while True:  # grow word by word until the candidate (with its end token) reaches cand_tokens
            text = f"Thought {j}: " + " ".join(words[j * 97 : j * 97 + n])
            if len(tokenize_candidates(tok, prefix, [Step(text, OBSERVATION)]).cand_ids[0]) >= cand_tokens:
                break
            n += 1
        cands.append(Step(text, OBSERVATION))
    return prefix, cands


def _interleaved_median_ms(
    fns: dict[str, object], repeats: int
) -> tuple[dict[str, float], dict[str, object]]:
    """Warm up each callable, then time them round-robin ``repeats`` times (so background load hits all
    alike); returns the median ms and the last output of each."""
    outs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def per_candidate_batch(toks, k: int) -> dict[str, torch.Tensor]:
    """Ordinary single-sequence batch for ``prefix + cand_k``: one step (action tokens; value at its end)."""
    ids = torch.tensor([toks.prefix_ids + toks.cand_ids[k]])
    P, T = len(toks.prefix_ids), ids.shape[1]
    token_step = torch.full_like(ids, -1)
    token_step[0, P + toks.cand_start[k] : P + toks.cand_action_end[k] + 1] = 0
    end = torch.tensor([[T - 1]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_step": token_step,
        "step_end_idx": end,
        "step_mask": end >= 0,
    }


def run(model_name: str, scorer_name: str, tok, prefix, cands, args) -> dict:
    torch.manual_seed(0)
    cfg = CONFIGS[model_name]
    if scorer_name == "value_rm":
        backbone = build_backbone(config=cfg, vocab_size=len(tok), attn_implementation=args.attn)
        model = ValueRewardModel(backbone).eval()
        scorer_cls = ValueRMScorer
    else:
        policy = build_backbone(
            config=cfg, vocab_size=len(tok), causal_lm=True, attn_implementation=args.attn
        )
        reference = copy.deepcopy(policy)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model = ImplicitPRM(policy.eval(), reference, beta=0.05)
        scorer_cls = ImplicitPRMScorer
        # the PRM scores action tokens only: give both paths the same action-only candidates of about
        # the same length (action and observation text joined into one action)
        cands = [f"{c.action} {c.observation}" for c in cands]

    def make(pack: bool):
        return scorer_cls(model, tok, max_length=args.max_length, pack=pack, batch_size=len(cands))

    toks = tokenize_candidates(tok, prefix, cands, max_length=args.max_length)
    batches = [per_candidate_batch(toks, k) for k in range(len(cands))]

    def alone() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.score(b)[:, 0] for b in batches])

    packed_s, plain_s = make(True), make(False)
    ms, out = _interleaved_median_ms(
        {
            "packed": lambda: packed_s.score_candidates(prefix, cands),
            "plain": lambda: plain_s.score_candidates(prefix, cands),
            "alone": alone,
        },
        args.repeats,
    )
    packed_ms, plain_ms, alone_ms = ms["packed"], ms["plain"], ms["alone"]
    ref = out["alone"]
    assert ref.abs().max() > 0, "degenerate benchmark: all scores are zero"
    diff = max((out["packed"] - ref).abs().max().item(), (out["plain"] - ref).abs().max().item())
    lens = [len(c) for c in toks.cand_ids]
    return {
        "model": model_name,
        "scorer": scorer_name,
        "attn": args.attn,
        "prefix_tokens": len(toks.prefix_ids),
        "k": len(cands),
        "cand_tokens_mean": round(sum(lens) / len(lens), 1),
        "packed_ms": round(packed_ms, 1),
        "plain_ms": round(plain_ms, 1),
        "per_candidate_ms": round(alone_ms, 1),
        "speedup": round(alone_ms / packed_ms, 2),
        "max_abs_diff": f"{diff:.2e}",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    p.add_argument(
        "--scorers", nargs="+", default=["value_rm", "implicit_prm"], choices=["value_rm", "implicit_prm"]
    )
    p.add_argument("--prefix", type=int, default=1024, help="prefix tokens")
    p.add_argument("--k", type=int, default=8, help="candidates")
    p.add_argument("--cand", type=int, default=64, help="tokens per candidate (incl. its end-of-turn token)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = train_tiny_tokenizer(trajectory_texts(read_jsonl(SAMPLE)), vocab_size=1024)
    prefix, cands = make_inputs(tok, args.prefix, args.k, args.cand)
    longest = max(len(c) for c in tokenize_candidates(tok, prefix, cands).cand_ids)
    args.max_length = args.prefix + longest  # left-truncates the prefix to exactly args.prefix tokens
    meta = {
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    rows = []
    head = (
        f"{'model':6} {'scorer':13} {'P':>5} {'K':>2} {'L':>5} {'packed ms':>10} {'plain ms':>10} "
        f"{'per-cand ms':>12} {'speed-up':>9} {'max|diff|':>9}"
    )
    print(f"{meta['device']}, torch {meta['torch']}, {meta['threads']} threads, fp32, attn={args.attn}")
    print(head)
    for m in args.models:
        for s in args.scorers:
            r = run(m, s, tok, prefix, cands, args)
            rows.append({**meta, **r})
            print(
                f"{m:6} {s:13} {r['prefix_tokens']:>5} {r['k']:>2} {r['cand_tokens_mean']:>5} "
                f"{r['packed_ms']:>10.1f} {r['plain_ms']:>10.1f} {r['per_candidate_ms']:>12.1f} "
                f"{r['speedup']:>8.2f}x {r['max_abs_diff']:>9}",
                flush=True,
            )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
