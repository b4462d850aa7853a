"""Environment worker pools: env steps/s and MCTS trees/min with 1 and 2 workers, side by side in one run.

Each configuration builds the same trees (``python -m agentrm.trees`` settings: expert policy
with ``--error_rate``, ``--simulations`` per tree) over the same task instances into a fresh
file; workers are spawned processes that each own their environments (ScienceWorld's JVM is
started inside every worker, and that start-up is part of the measured time).  Env steps come
from the trees' own counters, so both runs do identical work (checked: the files must be
byte-identical).  A table goes to stdout and rows are appended to ``bench/results/workers.csv``.

    python bench/bench_workers.py                                  # ScienceWorld, 32 trees
    python bench/bench_workers.py --envs babyai:GoToLocal?max_steps=24 --trees 16
    python bench/bench_workers.py --backend ray                    # the same through Ray
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentrm.search.specs import PolicySpec  # noqa: E402
from agentrm.trees import TreesConfig, build_trees  # noqa: E402


def run(envs: list[str], trees: int, workers: int, backend: str, args, out: Path) -> dict:
    t0 = time.perf_counter()
    s = build_trees(TreesConfig(
        out=str(out),
        envs=envs,
        episodes=max(1, trees // len(envs)),
        simulations=args.simulations,
        k=args.k,
        max_depth=args.max_depth,
        policy=PolicySpec(kind="expert", error_rate=args.error_rate),
        seed=args.seed,
        workers=workers,
        backend=backend,
        overwrite=True,
        progress=False,
    ))
    wall = time.perf_counter() - t0
    return {"workers": workers, "trees": s["trees"], "env_steps": s["env_steps"], "wall_s": wall,
            "steps_per_s": s["env_steps"] / wall, "trees_per_min": 60 * s["trees"] / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", nargs="+", default=["sciworld:find-living-thing?max_steps=30",
                                                 "sciworld:find-plant?max_steps=30"])
    p.add_argument("--trees", type=int, default=32)
    p.add_argument("--simulations", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--max_depth", type=int, default=30)
    p.add_argument("--error_rate", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for w in (1, 2):
            outs[w] = Path(tmp) / f"w{w}.jsonl"
            rows.append(run(args.envs, args.trees, w, args.backend if w > 1 else "local", args, outs[w]))
        identical = outs[1].read_bytes() == outs[2].read_bytes()
    base = rows[0]
    print(f"\nenv worker pool ({args.backend}), {', '.join(args.envs)}; {args.trees} trees x {args.simulations} simulations")
    print(f"{'workers':>7} {'trees':>5} {'env steps':>9} {'wall s':>7} {'steps/s':>8} {'trees/min':>9} {'speed-up':>8}")
    for r in rows:
        r["speedup"] = base["wall_s"] / r["wall_s"]
        print(f"{r['workers']:>7} {r['trees']:>5} {r['env_steps']:>9} {r['wall_s']:>7.1f} {r['steps_per_s']:>8.1f} "
              f"{r['trees_per_min']:>9.2f} {r['speedup']:>7.2f}x")
    print(f"identical output with 1 and 2 workers: {identical}")
    if not identical:
        raise SystemExit("outputs differ between worker counts: the pool is not deterministic")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    path = REPO / "bench" / "results" / "workers.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "commit", "host", "cpus", "backend", "envs", "workers", "trees", "env_steps",
                        "wall_s", "steps_per_s", "trees_per_min", "speedup"])
        for r in rows:
            w.writerow([dt.datetime.now().isoformat(timespec="seconds"), commit, platform.node(),
                        __import__("os").cpu_count(), args.backend, " ".join(args.envs), r["workers"], r["trees"],
                        r["env_steps"], f"{r['wall_s']:.2f}", f"{r['steps_per_s']:.2f}", f"{r['trees_per_min']:.3f}",
                        f"{r['speedup']:.3f}"])


if __name__ == "__main__":
    main()
