"""Serving benchmark: ``python -m agentrm.serve`` under concurrent clients, its memory under sustained load, and a
remote beam search against the in-process one. Everything is measured side by side in one run.

1. **Throughput and latency**: for each model (``tiny``: the default fit's 4x128 LLaMA; ``mid``: 8x512), two
   servers run at once, batching on (``max_batch_size=16``, ``batch_timeout=5 ms``) and off
   (``max_batch_size=1``); 1, 4 and 16 client threads send candidate-scoring requests back to back (a BabyAI
   prefix and 4 candidate steps, no session, so requests of different clients can share forwards) for
   ``--seconds``, to each server in turn, ``--rounds`` times (the median round is kept); requests/s, p50 and
   p99 latency. Targets: >= 3x requests/s at 16 clients with batching vs 1 client;
   p99 < 2x p50 at 4 clients.
2. **Memory**: the server's resident memory (worker, and the whole process tree) after a warm-up and after a
   sustained run of ``--duration`` seconds (default 300) at 4 clients, half the requests in rotating sessions
   (so session caches are made and dropped). Target: growth < 5%.
3. **Remote beam search**: ``python -m agentrm.search``'s beam search (W=2, K=4) with the value RM in process
   and the same RM behind a server (``kind: remote``) on the same episodes: RM tokens per episode and wall
   time, remote / in-process. Target: within 1.3x.

Clients run in this process (threads, ``httpx``); the server's worker uses ``--num_threads`` torch threads. The
load average of the machine is printed with every phase (the CPU may be shared). A table goes to stdout and
rows are appended to ``bench/results/serve.csv`` (device, versions, commit, load).

    python bench/bench_serve.py                        # everything, 5-minute memory run
    python bench/bench_serve.py --duration 60 --seconds 8 --models tiny
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentrm.data.schema import read_jsonl  # noqa: E402
from agentrm.scoring.remote import candidate_json, trajectory_json  # noqa: E402
from tests.serve.server_proc import TOKENIZER, ServerProcess  # noqa: E402

DEFAULT_CSV = REPO / "bench" / "results" / "serve.csv"
SAMPLE = REPO / "agentrm" / "assets" / "babyai_sample.jsonl"
BASE = {"model_type": "llama", "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
CONFIGS = {  # tiny = configs/tiny/value_rm.yaml's backbone; mid = bench_scoring.py's
    "tiny": {**BASE, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4},
    "mid": {**BASE, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 8},
}
CLIENTS = (1, 4, 16)
BATCHING = {"on": ["--max_batch_size", "16", "--batch_timeout", "0.005"], "off": ["--max_batch_size", "1"]}


def export_model(name: str, root: Path) -> str:
    """A random value RM of config ``name`` with the tiny tokenizer (weights do not change the cost)."""
    import torch

    from agentrm.models.backbone import build_backbone
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    rm = ValueRewardModel(build_backbone(config=CONFIGS[name], vocab_size=len(tok)), value_activation="sigmoid")
    return str(rm.save_pretrained(root / name, tokenizer=tok))


def request_bodies(n: int = 32) -> list[dict]:
    """Candidate-scoring requests from the BabyAI sample: a 2-step prefix and the next 4 steps as candidates."""
    out = []
    for t in read_jsonl(SAMPLE):
        if len(t.steps) >= 6:
            prefix = type(t)(t.id, t.task, t.instruction, t.steps[:2], 0.0, False)
            out.append({"items": [{"prefix": trajectory_json(prefix),
                                   "candidates": [candidate_json(s) for s in t.steps[2:6]]}]})
        if len(out) == n:
            break
    return out


def load(url: str, bodies: list[dict], clients: int, seconds: float, sessions: int = 0) -> dict:
    """``clients`` threads posting ``bodies`` back to back for ``seconds``: requests/s, p50/p99 latency (ms)."""
    stop = time.monotonic() + seconds
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        mine, n = [], 0
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop:
                body = bodies[(c * 7 + n) % len(bodies)]
                if sessions and n % 2:
                    body = {**body, "session": f"c{c}-{n % sessions}"}
                t0 = time.perf_counter()
                r = http.post(url + "/v1/score/candidates", json=body)
                dt_ms = 1000 * (time.perf_counter() - t0)
                if r.status_code == 200:
                    mine.append(dt_ms)
                else:
                    with lock:
                        errors[0] += 1
                n += 1
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {"requests": len(lat), "errors": errors[0], "req_s": len(lat) / wall, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "mean_ms": statistics.fmean(lat) if lat else float("nan")}


def tree_rss(pid: int) -> tuple[int, int]:
    """``(worker RSS, whole tree RSS)`` in bytes (the worker: the largest child)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = [p.memory_info().rss for p in procs if p.is_running()]
    return max(rss[1:] or rss), sum(rss)


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def throughput(models: list[str], seconds: float, threads: int, rounds: int, root: Path, rows: list[dict]) -> None:
    """Both servers of a model (batching on and off) run at once, measured in turns at each client count (so a
    change in the machine's load between measurements hits both alike); the median round is kept."""
    bodies = request_bodies()
    for model in models:
        path = export_model(model, root)
        servers = {b: ServerProcess(path, [*args, "--num_threads", str(threads), "--max_queue", "256"], key=None,
                                    log=root / f"{model}-{b}.log") for b, args in BATCHING.items()}
        try:
            for server in servers.values():
                server.start()
                load(server.url, bodies, 4, 2.0)  # warm-up
            for clients in CLIENTS:
                got: dict[str, list[dict]] = {b: [] for b in servers}
                for _ in range(rounds):
                    for batching, server in servers.items():
                        got[batching].append(load(server.url, bodies, clients, seconds))
                for batching, runs in got.items():
                    res = sorted(runs, key=lambda r: r["req_s"])[len(runs) // 2]
                    rows.append({"phase": "throughput", "model": model, "batching": batching, "clients": clients,
                                 **res, "rounds": rounds, "load": loadavg()})
                    print(f"{model:5} batching {batching:3} clients {clients:2}: {res['req_s']:7.1f} req/s  "
                          f"p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}  "
                          f"(median of {rounds}; load {loadavg()})", flush=True)
        finally:
            for server in servers.values():
                server.stop()


def memory(duration: float, threads: int, root: Path, rows: list[dict]) -> None:
    path = export_model("tiny", root) if not (root / "tiny").exists() else str(root / "tiny")
    bodies = request_bodies()
    with ServerProcess(path, [*BATCHING["on"], "--num_threads", str(threads), "--max_sessions", "32",
                              "--max_queue", "256"], key=None, log=root / "memory.log") as server:
        load(server.url, bodies, 4, 20.0, sessions=50)  # warm-up: allocator arenas, session caches filled
        before = tree_rss(server.proc.pid)
        res = load(server.url, bodies, 4, duration, sessions=50)
        after = tree_rss(server.proc.pid)
    growth = [(a - b) / b for a, b in zip(after, before)]
    rows.append({"phase": "memory", "model": "tiny", "batching": "on", "clients": 4, **res, "load": loadavg(),
                 "duration_s": duration, "worker_rss_before_mb": before[0] / 2**20, "worker_rss_after_mb": after[0] / 2**20,
                 "tree_rss_before_mb": before[1] / 2**20, "tree_rss_after_mb": after[1] / 2**20,
                 "worker_growth": growth[0], "tree_growth": growth[1]})
    print(f"memory over {duration:.0f} s ({res['requests']} requests): worker {before[0] / 2**20:.1f} -> "
          f"{after[0] / 2**20:.1f} MiB ({growth[0]:+.2%}), tree {before[1] / 2**20:.1f} -> {after[1] / 2**20:.1f} MiB "
          f"({growth[1]:+.2%}) (load {loadavg()})", flush=True)


def remote_beam(model_dir: str, episodes: int, threads: int, root: Path, rows: list[dict]) -> None:
    from agentrm.search.evaluate import EvalConfig, evaluate
    from agentrm.search.specs import PolicySpec, ScorerSpec

    with ServerProcess(model_dir, [*BATCHING["on"], "--num_threads", str(threads)], key=None,
                       log=root / "beam.log") as server:
        out = {}
        for name, spec in (("in_process", ScorerSpec(path=model_dir, name="rm")),
                           ("remote", ScorerSpec(kind="remote", url=server.url, name="rm"))):
            cfg = EvalConfig(out_dir=str(root / f"beam-{name}"), held_in=["babyai:GoToLocal?max_steps=24"],
                             episodes=episodes, policy=PolicySpec(kind="expert", error_rate=0.5), scorers=[spec],
                             greedy=False, best_of_n=[], beam=[(2, 4)], num_threads=threads, progress=False, show=False,
                             train_episodes=50)
            t0 = time.perf_counter()
            evaluate(cfg)
            rs = [json.loads(x) for x in (root / f"beam-{name}" / "episodes.jsonl").read_text().splitlines()]
            out[name] = {"tokens_ep": statistics.fmean(r["tokens_scored"] for r in rs),
                         "wall_s": sum(r["wall_s"] for r in rs), "run_s": time.perf_counter() - t0,
                         "wait_s": sum(r.get("server_wait_s", 0.0) for r in rs),
                         "actions": [r["actions"] for r in rs]}
    same = out["remote"]["actions"] == out["in_process"]["actions"]
    tok = out["remote"]["tokens_ep"] / out["in_process"]["tokens_ep"]
    wall = out["remote"]["wall_s"] / out["in_process"]["wall_s"]
    rows.append({"phase": "remote_beam", "model": Path(model_dir).name, "episodes": episodes,
                 "tokens_ep_local": out["in_process"]["tokens_ep"], "tokens_ep_remote": out["remote"]["tokens_ep"],
                 "wall_local_s": out["in_process"]["wall_s"], "wall_remote_s": out["remote"]["wall_s"],
                 "server_wait_s": out["remote"]["wait_s"], "tokens_ratio": tok, "wall_ratio": wall,
                 "same_actions": same, "load": loadavg()})
    print(f"beam W=2 K=4, {episodes} episodes: RM tokens/episode {out['in_process']['tokens_ep']:.0f} in process, "
          f"{out['remote']['tokens_ep']:.0f} remote ({tok:.2f}x); beam wall {out['in_process']['wall_s']:.1f} s vs "
          f"{out['remote']['wall_s']:.1f} s ({wall:.2f}x; {out['remote']['wait_s']:.1f} s waiting on the server); "
          f"same actions: {same} (load {loadavg()})", flush=True)


def summary(rows: list[dict]) -> None:
    tp = {(r["model"], r["batching"], r["clients"]): r for r in rows if r["phase"] == "throughput"}
    print("\n| model | batching | clients | req/s | p50 ms | p99 ms | p99/p50 | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (m, b, c), r in tp.items():
        print(f"| {m} | {b} | {c} | {r['req_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['p99_ms'] / r['p50_ms']:.2f} | {r['errors']} |")
    print("\ntargets:")
    for m in sorted({k[0] for k in tp}):
        if (m, "on", 16) in tp and (m, "on", 1) in tp:
            ratio = tp[(m, "on", 16)]["req_s"] / tp[(m, "on", 1)]["req_s"]
            print(f"  {m}: req/s at 16 clients with batching / 1 client = {ratio:.2f}x (target >= 3x): "
                  f"{'met' if ratio >= 3 else 'MISSED'}")
        if (m, "off", 16) in tp and (m, "on", 16) in tp:
            print(f"  {m}: batching on / off at 16 clients = {tp[(m, 'on', 16)]['req_s'] / tp[(m, 'off', 16)]['req_s']:.2f}x")
        for b in ("on", "off"):
            if (m, b, 4) in tp:
                q = tp[(m, b, 4)]["p99_ms"] / tp[(m, b, 4)]["p50_ms"]
                print(f"  {m} batching {b}: p99/p50 at 4 clients = {q:.2f} (target < 2): {'met' if q < 2 else 'MISSED'}")
    for r in rows:
        if r["phase"] == "memory":
            print(f"  memory growth over {r['duration_s']:.0f} s: worker {r['worker_growth']:+.2%}, tree "
                  f"{r['tree_growth']:+.2%} (target < 5%): {'met' if max(r['worker_growth'], r['tree_growth']) < 0.05 else 'MISSED'}")
        if r["phase"] == "remote_beam":
            ok = r["tokens_ratio"] <= 1.3 and r["wall_ratio"] <= 1.3
            print(f"  remote beam / in process: tokens {r['tokens_ratio']:.2f}x, wall {r['wall_ratio']:.2f}x "
                  f"(target <= 1.3x): {'met' if ok else 'MISSED'}; same actions: {r['same_actions']}")


def write_csv(rows: list[dict], path: Path) -> None:
    import litserve
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "device": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "litserve": litserve.__version__,
            "commit": commit}
    fields = list(meta) + sorted({k for r in rows for k in r})
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=list(CONFIGS))
    p.add_argument("--seconds", type=float, default=10.0, help="one measurement (per server and client count)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per server and client count (median kept)")
    p.add_argument("--duration", type=float, default=300.0, help="the sustained memory run (seconds)")
    p.add_argument("--beam_episodes", type=int, default=6)
    p.add_argument("--beam_model", default=None, help="RM directory for the beam comparison (default: "
                   "runs/tiny_value_rm/hf_model if it exists, else the random tiny one)")
    p.add_argument("--num_threads", type=int, default=1, help="torch threads of the server's worker")
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "memory", "beam"])
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = p.parse_args(argv)
    rows: list[dict] = []
    print(f"load average at start: {loadavg()} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        root = Path(tmp)
        if "throughput" not in args.skip:
            throughput(args.models, args.seconds, args.num_threads, args.rounds, root, rows)
        if "memory" not in args.skip:
            memory(args.duration, args.num_threads, root, rows)
        if "beam" not in args.skip:
            trained = REPO / "runs" / "tiny_value_rm" / "hf_model"
            model = args.beam_model or (str(trained) if trained.exists() else export_model("tiny", root))
            remote_beam(model, args.beam_episodes, args.num_threads, root, rows)
    summary(rows)
    write_csv(rows, args.csv)
    print(f"rows appended to {args.csv}")
    return rows


if __name__ == "__main__":
    main()
