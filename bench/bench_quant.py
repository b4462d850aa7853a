"""Quantised loading on CPU (bitsandbytes nf4 / int8) against fp32: resident size, speed, logit drift.

Loads a causal LM (default: SmolLM2-135M-Instruct, ``bash scripts/setup.sh --models``) through
:func:`agentrm.models.backbone.build_backbone` on the CPU in each variant: ``fp32``, ``bf16``,
``nf4`` and ``int8`` with fp32 compute, ``nf4`` and ``int8`` with bf16 compute (the unquantised
modules, embeddings, norms and ``lm_head``, are kept in the compute dtype). Columns:

* ``param MB``: bytes of every parameter and buffer, plus bitsandbytes' quantisation state (nf4
  ``absmax`` and its nested constants, int8 row scales ``SCB``), i.e. what the weights occupy;
* ``RSS MB``: growth of the process's resident set from before loading to after loading and one
  forward pass, measured in a fresh subprocess per variant (``MALLOC_MMAP_THRESHOLD_`` fixed so
  freed tensors leave RSS at once); ``fp32/this``: the fp32 row's figure divided by this row's. A line
  under the table gives the first quantised variant's RSS without
  :func:`agentrm.models.quant.own_unquantized_tensors` (tensors left in the checkpoint's memory map);
* ``fwd ms``: median wall time of a no-grad forward over ``--batch x --seq`` tokens of real episodes
  (``agentrm/assets/babyai_sample.jsonl`` through the model's chat template: a scoring-shaped prefill), all variants loaded in one process and timed round-robin for
  ``--rounds`` rounds after one warm-up, ``--threads`` torch threads (default 1); ``this/fp32``: ratio
  to the fp32 row (above 1 = slower);
* ``max |dlogit|``: largest absolute difference of the logits from fp32 on the same tokens
  (``|logit| max`` gives the scale), ``mean |dlogit|``, and ``top-1 agree``: share of positions whose
  arg-max (next-token prediction) equals fp32's.

    python bench/bench_quant.py                              # SmolLM2-135M, 1 x 256 tokens
    python bench/bench_quant.py --model PATH --rounds 3      # any local HF causal LM
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "agentrm" / "assets" / "babyai_sample.jsonl"
VARIANTS = {  # name: (dtype, quantization)
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "nf4 / fp32 compute": ("float32", "nf4"),
    "nf4 / bf16 compute": ("bfloat16", "nf4"),
    "int8 / fp32 compute": ("float32", "int8"),
    "int8 / bf16 compute": ("bfloat16", "int8"),
}


def rss_mb() -> float:
    """Resident set size of this process in MB (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, plus bitsandbytes quantisation state (absmax, nested absmax, SCB)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += sum(v.numel() * v.element_size() for v in qs.as_dict().values() if torch.is_tensor(v))
        scb = getattr(p, "SCB", None)
        if torch.is_tensor(scb):
            total += scb.numel() * scb.element_size()
    return total


def load(model: str, variant: str) -> torch.nn.Module:
    from agentrm.models.backbone import build_backbone

    dtype, quantization = VARIANTS[variant]
    return build_backbone(model, causal_lm=True, dtype=dtype, quantization=quantization, device="cpu").eval()


def inputs(model: str, batch: int, seq: int) -> torch.Tensor:
    """``[batch, seq]`` token ids of real episodes: BabyAI trajectories rendered by the model's chat template."""
    from agentrm.data.schema import read_jsonl
    from agentrm.paths import load_tokenizer

    tok = load_tokenizer(model)
    stream: list[int] = []
    for traj in read_jsonl(SAMPLE):
        stream += tok.apply_chat_template(traj.to_messages(), tokenize=True, return_dict=True)["input_ids"]
        if len(stream) >= batch * seq:
            return torch.tensor(stream[: batch * seq]).view(batch, seq)
    raise ValueError(f"{SAMPLE} holds fewer than {batch * seq} tokens")


def child(args: argparse.Namespace) -> None:
    """One variant in a fresh process: RSS growth over loading + one forward; prints one JSON line."""
    import bitsandbytes  # noqa: F401  (imported before the baseline: library code is not the model's size)
    import transformers  # noqa: F401

    import agentrm.models.backbone  # noqa: F401
    import agentrm.models.quant

    if args.keep_map:  # what a quantised load held before agentrm copied tensors out of the checkpoint's map
        agentrm.models.quant.own_unquantized_tensors = lambda model: 0

    ids = inputs(args.model, args.batch, args.seq)  # the tokenizer is not the model's size either
    gc.collect()
    before = rss_mb()
    model = load(args.model, args.child)
    with torch.inference_mode():
        model(input_ids=ids)
    gc.collect()
    print(json.dumps({"rss_mb": rss_mb() - before, "weight_bytes": weight_bytes(model)}))


def measure_rss(args: argparse.Namespace, variant: str, keep_map: bool = False) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model,
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
           *(["--keep-map"] if keep_map else [])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant}: child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="known model name or local HF directory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads time the contention)")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--keep-map", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    variants = ["fp32", *[v for v in args.variants if v != "fp32"]]
    t0 = time.time()
    rss = {v: measure_rss(args, v) for v in variants}
    quantised = [v for v in variants if VARIANTS[v][1] is not None]
    kept = {v: measure_rss(args, v, keep_map=True)["rss_mb"] for v in quantised[:1]}
    models = {v: load(args.model, v) for v in variants}
    ids = inputs(args.model, args.batch, args.seq)
    times: dict[str, list[float]] = {v: [] for v in variants}
    logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for v in variants:  # warm-up, and the logits compared below
            logits[v] = models[v](input_ids=ids).logits.float()
        for _ in range(args.rounds):
            for v in variants:
                start = time.perf_counter()
                models[v](input_ids=ids)
                times[v].append(time.perf_counter() - start)
    ref, ref_ms = logits["fp32"], statistics.median(times["fp32"]) * 1e3
    import bitsandbytes
    import transformers

    print(f"# {args.model}, batch {args.batch} x {args.seq} tokens, {args.rounds} rounds; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"{platform.machine()} x{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
          f"|logit| max {ref.abs().max():.1f}; {time.time() - t0:.0f} s")
    header = f"{'variant':>20}  {'param MB':>8}  {'RSS MB':>7}  {'fp32/this':>9}  {'fwd ms':>8}  {'this/fp32':>9}  " \
             f"{'max |dlogit|':>12}  {'mean |dlogit|':>13}  {'top-1 agree':>11}"
    print(header)
    print("-" * len(header))
    for v in variants:
        ms = statistics.median(times[v]) * 1e3
        agree = (logits[v].argmax(-1) == ref.argmax(-1)).float().mean()
        print(f"{v:>20}  {rss[v]['weight_bytes'] / 2**20:>8.1f}  {rss[v]['rss_mb']:>7.1f}  "
              f"{rss['fp32']['rss_mb'] / rss[v]['rss_mb']:>9.2f}  {ms:>8.1f}  {ms / ref_ms:>9.2f}  "
              f"{(logits[v] - ref).abs().max():>12.3f}  {(logits[v] - ref).abs().mean():>13.3f}  {agree:>11.3f}")
    for v, mb in kept.items():
        print(f"{v} without copying the unquantised tensors out of the checkpoint's memory map: RSS {mb:.1f} MB "
              f"(vs {rss[v]['rss_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
