"""Frozen-backbone value RMs on the CPU: precompute throughput, head training time, truncated vs full scoring.

For each backbone (default: SmolLM2-135M-Instruct, Gemma-3-270M, all-MiniLM-L6-v2; ``bash scripts/setup.sh
--models``), on the first ``--trajectories`` episodes of ``--data`` (default the shipped ScienceWorld sample:
long observations) at ``--max_length`` tokens, in one process with ``--threads`` torch threads:

* ``precompute L``: ``python -m agentrm.precompute`` caching the state of block ``L`` (``--layer_fraction`` of the
  depth, rounded) at every step end: only blocks ``1..L`` run; ``precompute N``: the last block (the whole
  backbone). Columns: states/s and tokens/s (wall time of the shards, tokenisation included);
* ``head fit``: :class:`agentrm.lit.head_module.FeatureHeadModule` (linear head, layer ``L``) trained for
  ``--epochs`` epochs through a Lightning ``Trainer`` on those features with the ordinary data module:
  ``setup s`` (tokenising the trajectories to find them in the cache) and ``s/epoch``, with the states/s of
  training;
* ``score trunc`` / ``score full``: :class:`agentrm.scoring.ValueRMScorer` ``score_trajectories`` on the same
  episodes with the exported RM (backbone truncated to ``L`` blocks) and with the same head on the full backbone
  (tokenisation with the chat template included); ``fwd trunc`` / ``fwd full``: the model forward alone
  (``ValueRewardModel.score`` on the same episodes, tokenised and batched beforehand, 4 per batch); medians of
  ``--rounds`` interleaved rounds; ``full/trunc``: the ratios (above 1: truncation saves that factor).

Prints a table and appends rows to ``bench/results/precompute.csv`` (device, versions, commit).

    python bench/bench_precompute.py                                   # all three backbones, 12 episodes
    python bench/bench_precompute.py --backbones all-minilm-l6-v2 --trajectories 24
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "agentrm" / "assets" / "sciworld_sample.jsonl"
BACKBONES = ("smollm2-135m-instruct", "gemma3-270m", "all-minilm-l6-v2")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _precompute(backbone: str, data: Path, out: Path, layer: int, max_length: int) -> dict:
    from agentrm.precompute import PrecomputeConfig, precompute

    s = precompute(PrecomputeConfig(data=[str(data)], out=str(out), backbone=backbone, max_length=max_length,
                                    layers=[layer], shard_size=8, batch_tokens=max_length * 2, progress=False))
    return {"states": s["states"], "tokens": s["tokens"], "seconds": s["seconds"]}


def _fit_head(features: Path, data: Path, backbone: str, max_length: int, epochs: int, workdir: Path):
    import lightning as L

    from agentrm.lit.datamodule import TrajectoryDataModule
    from agentrm.lit.head_module import FeatureHeadModule

    L.seed_everything(0)
    module = FeatureHeadModule(features=str(features), tokenizer=backbone, learning_rate=3e-3, warmup_steps=2)
    dm = TrajectoryDataModule(train_path=str(data), tokenizer=backbone, max_length=max_length, batch_size=8,
                              val_fraction=0.25, min_labels=1, allow_degenerate=True, split_seed=1)
    t0 = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(workdir))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    train_states = sum(len(it.step_end_idx) for it in dm.train_items)
    export = module.export(workdir / "head_rm", max_length=max_length)
    return {"setup_s": setup_s, "s_per_epoch": fit_s / epochs, "train_states": train_states,
            "fit_states_per_s": train_states * epochs / fit_s}, module, export


def _score_times(export: Path, module, backbone: str, trajs, max_length: int, rounds: int) -> dict[str, float]:
    from agentrm.models.backbone import build_backbone
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer
    from agentrm.scoring import ValueRMScorer

    tok = load_tokenizer(backbone)
    trunc = ValueRewardModel.from_pretrained(export)
    full = ValueRewardModel(build_backbone(backbone), value_activation=trunc.value_activation, causal=trunc.causal,
                            pooling=trunc.pooling)
    full.value_head.load_state_dict(trunc.value_head.state_dict())
    scorers = {"trunc": ValueRMScorer(trunc, tok, max_length=max_length, batch_size=4),
               "full": ValueRMScorer(full, tok, max_length=max_length, batch_size=4)}
    from agentrm.data.collate import collate_trajectories
    from agentrm.data.tokenize import tokenize_trajectory

    items = [tokenize_trajectory(tok, t, max_length) for t in trajs]
    batches = [collate_trajectories(items[i : i + 4], tok.pad_token_id) for i in range(0, len(items), 4)]
    times: dict[str, list[float]] = {"trunc": [], "full": [], "fwd trunc": [], "fwd full": []}
    for _ in range(rounds):
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            scorer.score_trajectories(trajs)
            times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for b in batches:
                scorer.model.score(b)
            times[f"fwd {name}"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--trajectories", type=int, default=12)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--layer_fraction", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(ROOT / "bench" / "results" / "precompute.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from agentrm.data.agentgym import load_trajectories
    from agentrm.data.schema import write_jsonl
    from agentrm.models.import_gguf import resolve_model

    trajs = load_trajectories(args.data)[: args.trajectories]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        write_jsonl(data, trajs)
        for backbone in args.backbones:
            resolve_model(backbone)  # import once (not timed)
            n = json.loads((Path(resolve_model(backbone)) / "config.json").read_text())
            n = n.get("num_hidden_layers") or n.get("text_config", {}).get("num_hidden_layers")
            layer = max(1, round(args.layer_fraction * n))
            work = Path(tmp) / backbone
            part = _precompute(backbone, data, work / f"L{layer}", layer, args.max_length)
            whole = _precompute(backbone, data, work / f"L{n}", n, args.max_length)
            fit, module, export = _fit_head(work / f"L{layer}", data, backbone, args.max_length, args.epochs, work)
            t = _score_times(export, module, backbone, trajs, args.max_length, args.rounds)
            row = {
                "backbone": backbone, "layers": n, "L": layer, "trajectories": len(trajs), "states": part["states"],
                "tokens": part["tokens"], "max_length": args.max_length, "threads": args.threads,
                "pre_L_states_per_s": part["states"] / part["seconds"],
                "pre_L_tokens_per_s": part["tokens"] / part["seconds"],
                "pre_N_states_per_s": whole["states"] / whole["seconds"],
                "pre_N_tokens_per_s": whole["tokens"] / whole["seconds"],
                "fit_setup_s": fit["setup_s"], "fit_s_per_epoch": fit["s_per_epoch"],
                "fit_states_per_s": fit["fit_states_per_s"], "score_trunc_s": t["trunc"], "score_full_s": t["full"],
                "full_over_trunc": t["full"] / t["trunc"], "fwd_trunc_s": t["fwd trunc"], "fwd_full_s": t["fwd full"],
                "fwd_full_over_trunc": t["fwd full"] / t["fwd trunc"],
            }
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    head = (f"{'backbone':>22} {'N':>3} {'L':>3} {'states':>6} {'pre L st/s':>10} {'pre N st/s':>10} "
            f"{'pre N tok/s':>11} {'fit setup s':>11} {'fit s/ep':>8} {'score trunc s':>13} {'score full s':>12} "
            f"{'full/trunc':>10} {'fwd trunc s':>11} {'fwd full s':>10} {'full/trunc':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backbone']:>22} {r['layers']:>3} {r['L']:>3} {r['states']:>6} {r['pre_L_states_per_s']:>10.2f} "
              f"{r['pre_N_states_per_s']:>10.2f} {r['pre_N_tokens_per_s']:>11.1f} {r['fit_setup_s']:>11.2f} "
              f"{r['fit_s_per_epoch']:>8.2f} {r['score_trunc_s']:>13.2f} {r['score_full_s']:>12.2f} "
              f"{r['full_over_trunc']:>10.2f} {r['fwd_trunc_s']:>11.2f} {r['fwd_full_s']:>10.2f} "
              f"{r['fwd_full_over_trunc']:>10.2f}")
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": platform.processor() or platform.machine(), "torch": torch.__version__, "commit": _commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*meta, *rows[0]] if rows else list(meta))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}})
    return rows


if __name__ == "__main__":
    main()
