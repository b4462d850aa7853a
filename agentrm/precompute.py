"""``python -m agentrm.precompute``: one resumable forward pass of a frozen backbone over trajectory files.

Example (SmolLM2 state features at layers 15 and 30, the residual stream after block 26 for top-layer LoRA,
and the implicit PRM's reference log-probs, all from one forward)::

    python -m agentrm.precompute --backbone smollm2-135m-instruct --data [data/train.jsonl] \\
        --out features/smollm2 --max_length 1024 --layers [15,30] --sequence_layers [26] \\
        --reference_logprobs true

What it writes (:mod:`agentrm.models.feature_cache` documents the format): ``manifest.json`` (backbone and
its fingerprint, tokenizer and its fingerprint, ``max_length``, layers, dtypes, inputs with fingerprints,
the shard list, counts, throughput) and shards of ``shard_size`` trajectories as safetensors.

* **Tokenisation** is the training one (:func:`agentrm.data.tokenize.tokenize_trajectory`: the chat template,
  exact step ends, over ``max_length`` the oldest whole steps dropped), so a training batch finds its
  trajectories in the cache by their token ids.
* **A causal LM** (SmolLM2, Gemma 3) gives every step end of a trajectory from one forward: a token sees only
  the tokens before it, so a step's features never depend on later steps. Only the blocks up to the highest
  layer asked for run (a layer-15 cache of SmolLM2 costs half a forward); reference log-probs need the whole
  model and its LM head (``token_logprobs``: no ``[tokens, vocab]`` logits).
* **A bidirectional encoder** (all-MiniLM-L6-v2) would let a step-end token see the later steps, and the
  outcome, so each state is encoded from **its own prefix only** (tokens up to its step end, one row per
  step) and pooled (``pooling``: ``mean`` by default, how the sentence encoder was trained; or ``last``), as
  :class:`~agentrm.models.value_rm.ValueRewardModel` with ``causal=False`` scores it.
* **Resuming**: shards are written atomically, then listed in the manifest; re-running the same command skips
  the listed shards. A directory written with another backbone (fingerprint), tokenizer, ``max_length``,
  layers, dtypes or input files is refused (one line naming what differs) unless ``--overwrite true``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from agentrm.checks import ConfigError, at_least, differing_fields, fail, one_of
from agentrm.cli_config import parse_config
from agentrm.cli_errors import run_cli
from agentrm.data.agentgym import load_trajectories
from agentrm.data.manifest import write_json_atomic
from agentrm.data.schema import Trajectory
from agentrm.data.tokenize import TokenizedTrajectory, tokenize_trajectory
from agentrm.models.backbone import DTYPES, build_backbone, resolve_dtype
from agentrm.models.feature_cache import (
    FORMAT,
    MANIFEST,
    read_manifest,
    sequence_key,
    shard_name,
    states_key,
    tokenizer_fingerprint,
    tokens_key,
)
from agentrm.models.fingerprint import model_fingerprint
from agentrm.models.head_call import causal_lm_head
from agentrm.models.layers import capture_blocks, layer_states, num_layers, states_from_blocks
from agentrm.models.value_rm import is_causal_backbone, pool_rows
from agentrm.paths import load_tokenizer, resolve_path

SETTINGS_COMPARED = ("backbone", "backbone_fingerprint", "tokenizer_fingerprint", "max_length", "layers",
                     "sequence_layers", "reference_logprobs", "pooling", "dtype", "sequence_dtype", "model_dtype",
                     "inputs", "max_trajectories", "shard_size")
"""Manifest fields a resumed run must match (anything else is bookkeeping)."""


@dataclass
class PrecomputeConfig:
    """``python -m agentrm.precompute``: every field is a flag (``--backbone``, ``--layers``...) or a YAML key.

    Attributes:
        data: trajectory files (native JSONL or AgentGym), read in order.
        out: the features directory (created; resumed when it holds this run's manifest).
        backbone: known model name (``smollm2-135m-instruct``, ``gemma3-270m``, ``all-minilm-l6-v2``), local
            directory or hub id; frozen.
        tokenizer: the tokenizer (default: the backbone's); must be the one training uses.
        max_length: token budget per trajectory (the training ``data.max_length``).
        layers: blocks (1-based) whose hidden state is cached at every step end (head-only value RMs).
        sequence_layers: blocks whose output (residual stream) is cached at every token, for training the blocks
            above them (top-layer LoRA); causal LMs only.
        reference_logprobs: cache ``log p(token | earlier tokens)`` of every token (the implicit PRM's
            reference); causal LMs only.
        pooling: how a non-causal encoder's state is read from its prefix row: ``mean`` (default for encoders)
            or ``last``; causal backbones always read the step-end token (``last``).
        dtype / sequence_dtype: storage of state features (default float32) and of sequence states (default
            bfloat16: half the disk; reference log-probs are always float32).
        model_dtype: dtype the backbone runs in (``None``: the checkpoint's, fp32 for the imported models).
        device: ``cpu`` or ``cuda`` (``None``: CUDA when available).
        shard_size: trajectories per shard (the unit of resuming).
        batch_tokens: padded tokens per forward (a batch of rows ``B x T`` stays within it, at least one row).
        max_trajectories: use only the first ``N`` trajectories of ``data`` (part of the settings).
        limit: stop after this many new shards (rerun to continue); ``None``: all.
        threads: torch CPU threads (``None``: torch's default).
        overwrite: start from scratch (removes the directory's manifest and shards, nothing else).
        value_range / skip_invalid: as the data module's (step values are checked, not used).
    """

    data: list[str] = field(default_factory=list)
    out: str = "features/out"
    backbone: str = "smollm2-135m-instruct"
    tokenizer: str | None = None
    max_length: int = 1024
    layers: list[int] = field(default_factory=list)
    sequence_layers: list[int] = field(default_factory=list)
    reference_logprobs: bool = False
    pooling: Literal["mean", "last"] | None = None
    dtype: str = "float32"
    sequence_dtype: str = "bfloat16"
    model_dtype: str | None = None
    device: str | None = None
    shard_size: int = 256
    batch_tokens: int = 4096
    max_trajectories: int | None = None
    limit: int | None = None
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            fail("data", "give at least one trajectory file")
        if not self.out:
            fail("out", "give the features directory")
        if not self.layers and not self.sequence_layers and not self.reference_logprobs:
            fail("layers", "nothing to compute: give layers, sequence_layers or reference_logprobs true")
        at_least(self.max_length, 2, "max_length")
        for name in ("layers", "sequence_layers"):
            for i, v in enumerate(getattr(self, name)):
                at_least(v, 1, f"{name}[{i}]")
        for name in ("dtype", "sequence_dtype"):
            one_of(getattr(self, name), DTYPES, name)
        if self.model_dtype is not None:
            one_of(self.model_dtype, DTYPES, "model_dtype")
        at_least(self.shard_size, 1, "shard_size")
        at_least(self.batch_tokens, 1, "batch_tokens")
        at_least(self.max_trajectories, 1, "max_trajectories", allow_none=True)
        at_least(self.limit, 1, "limit", allow_none=True)
        at_least(self.threads, 1, "threads", allow_none=True)


# --- the forward passes ---------------------------------------------------------------------------


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [R, T]`` and ``attention_mask [R, T]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive index groups whose padded size ``len(group) * max(length)`` stays within ``budget``."""
    group: list[int] = []
    width = 0
    for i, n in enumerate(lengths):
        w = max(width, n)
        if group and w * (len(group) + 1) > budget:
            yield group
            group, w = [], n
        group.append(i)
        width = w
    if group:
        yield group


@torch.no_grad()
def causal_outputs(model, items: list[TokenizedTrajectory], cfg: PrecomputeConfig, pad_id: int) -> list[dict]:
    """Per trajectory: ``states.L<l> [S, H]``, ``tokens.L<l> [T, H]``, ``ref_logprobs [T]`` from one forward each batch.

    ``model`` is a causal LM when reference log-probs are wanted (the whole model runs), else its base model
    (only the blocks up to the highest layer run).
    """
    from agentrm.kernels import token_logprobs

    dev = next(model.parameters()).device
    out: list[dict] = [{} for _ in items]
    wanted = sorted(set(cfg.layers) | set(cfg.sequence_layers))
    for group in _batches([len(it.input_ids) for it in items], cfg.batch_tokens):
        ids, mask = _pad([items[i].input_ids for i in group], pad_id, dev)
        B, T = ids.shape
        if cfg.reference_logprobs:
            lens = mask.sum(1)
            b, t = (torch.arange(T, device=dev)[None, :] < (lens - 1)[:, None]).nonzero(as_tuple=True)
            rows, targets = b * T + t, ids[b, t + 1]

            def next_token_logprobs(head, h, rows=rows, targets=targets):
                return token_logprobs(h.reshape(-1, h.shape[-1]).index_select(0, rows), head.weight, targets)

            with capture_blocks(model, wanted) as box:
                logp = causal_lm_head(model, next_token_logprobs, input_ids=ids, attention_mask=mask)
            states = states_from_blocks(model, box, cfg.layers, cfg.sequence_layers)
            ref = torch.zeros((B, T), dtype=torch.float32, device=dev)
            ref[b, t + 1] = logp.float()
        else:
            states = layer_states(model, cfg.layers, cfg.sequence_layers, input_ids=ids, attention_mask=mask)
        for j, i in enumerate(group):
            it, rec = items[i], out[i]
            ends = torch.tensor(it.step_end_idx, dtype=torch.long, device=dev)
            for layer in cfg.layers:
                rec[states_key(layer)] = states[layer][j].index_select(0, ends).to(resolve_dtype(cfg.dtype)).cpu()
            for layer in cfg.sequence_layers:
                rec[tokens_key(layer)] = states[-layer][j, : len(it.input_ids)].to(
                    resolve_dtype(cfg.sequence_dtype)).cpu()
            if cfg.reference_logprobs:
                rec["ref_logprobs"] = ref[j, : len(it.input_ids)].cpu()
    return out


@torch.no_grad()
def encoder_outputs(model, items: list[TokenizedTrajectory], cfg: PrecomputeConfig, pad_id: int,
                    pooling: str) -> list[dict]:
    """Per trajectory ``states.L<l> [S, H]`` of a bidirectional encoder: step ``i`` from its own prefix
    ``input_ids[: step_end_idx[i] + 1]`` only, pooled (``pooling``), so no state depends on later steps."""
    dev = next(model.parameters()).device
    rows = [(i, s, e) for i, it in enumerate(items) for s, e in enumerate(it.step_end_idx)]
    feats: dict[int, list[torch.Tensor]] = {layer: [] for layer in cfg.layers}
    for group in _batches([e + 1 for _, _, e in rows], cfg.batch_tokens):
        ids, mask = _pad([items[rows[r][0]].input_ids[: rows[r][2] + 1] for r in group], pad_id, dev)
        ends = mask.sum(1) - 1
        states = layer_states(model, cfg.layers, input_ids=ids, attention_mask=mask)
        for layer in cfg.layers:
            feats[layer].append(pool_rows(states[layer], mask, ends, pooling).to(resolve_dtype(cfg.dtype)).cpu())
    out: list[dict] = [{} for _ in items]
    for layer in cfg.layers:
        allf = torch.cat(feats[layer]) if feats[layer] else torch.zeros((0, model.config.hidden_size))
        start = 0
        for i, it in enumerate(items):
            out[i][states_key(layer)] = allf[start : start + len(it.step_end_idx)]
            start += len(it.step_end_idx)
    return out


# --- the directory ---------------------------------------------------------------------------------


def write_shard(path: Path, items: list[TokenizedTrajectory], outputs: list[dict], names: list[str]) -> dict:
    """Write one shard atomically; return its manifest entry (file, counts)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {
        "key": torch.tensor([sequence_key(it.input_ids) for it in items], dtype=torch.long),
        "num_tokens": torch.tensor([len(it.input_ids) for it in items], dtype=torch.long),
        "num_states": torch.tensor([len(it.step_end_idx) for it in items], dtype=torch.long),
        "step_end_idx": torch.tensor([e for it in items for e in it.step_end_idx], dtype=torch.long),
    }
    for name in names:
        tensors[name] = torch.cat([o[name] for o in outputs]).contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"ids": json.dumps([it.id for it in items])})
    os.replace(tmp, path)
    return {"file": path.name, "trajectories": len(items), "states": int(tensors["num_states"].sum()),
            "tokens": int(tensors["num_tokens"].sum())}


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> dict:
    """The manifest to continue: the existing one when its settings match, else a fresh one."""
    if out.exists() and not out.is_dir():
        fail("out", f"{out} is a file, not a features directory")
    ours = [out / MANIFEST, *out.glob("shard-*.safetensors"), *out.glob(".*.tmp-*")] if out.is_dir() else []
    if out.is_dir() and (out / MANIFEST).exists() and not overwrite:
        old = read_manifest(out)
        changed = differing_fields(old, settings, SETTINGS_COMPARED)
        if changed:
            raise ConfigError(f"out: {out} holds features of other settings ({changed}); "
                              "pass --overwrite true or choose another --out")
        for stray in out.glob(".*.tmp-*"):
            stray.unlink()
        return old
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()) and not overwrite:
        fail("out", f"{out} exists and holds files but no {MANIFEST}: not a features directory; choose another --out")
    if overwrite:
        for f in ours:
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**settings, "shards": [], "complete": False}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _load(cfg: PrecomputeConfig) -> tuple[list[Trajectory], list[dict]]:
    trajs, inputs = [], []
    for path in cfg.data:
        p = resolve_path(path)
        got = load_trajectories(p, skip_invalid=cfg.skip_invalid, value_range=tuple(cfg.value_range))
        inputs.append({"path": str(path), "fingerprint": model_fingerprint(p), "records": len(got)})
        trajs.extend(got)
    if cfg.max_trajectories is not None:
        trajs = trajs[: cfg.max_trajectories]
    if not trajs:
        fail("data", f"{', '.join(cfg.data)} holds no trajectory")
    return trajs, inputs


def _backbone_fingerprint(name: str) -> str:
    from agentrm.models.import_gguf import resolve_model

    try:
        return model_fingerprint(resolve_path(resolve_model(name)))
    except FileNotFoundError:
        return f"hub:{name}"  # a hub id: its files are in the HF cache, not a directory of ours


def precompute(cfg: PrecomputeConfig) -> dict[str, Any]:
    """Run (or resume) the precompute of ``cfg``; return the manifest's summary fields and ``seconds``."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trajs, inputs = _load(cfg)
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights"
    tok = load_tokenizer(cfg.tokenizer or cfg.backbone)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with_lm = cfg.reference_logprobs
    model = build_backbone(cfg.backbone, causal_lm=with_lm, dtype=cfg.model_dtype, device=device).eval()
    model.requires_grad_(False)
    causal = is_causal_backbone(model.config)
    n_layers = num_layers(model)
    for name in ("layers", "sequence_layers"):
        bad = [v for v in getattr(cfg, name) if v > n_layers]
        if bad:
            fail(name, f"{bad} out of range: {cfg.backbone} has blocks 1..{n_layers}")
    if not causal and (cfg.sequence_layers or cfg.reference_logprobs):
        fail("sequence_layers" if cfg.sequence_layers else "reference_logprobs",
             f"{cfg.backbone} is a bidirectional encoder: only per-step states (layers) can be cached without "
             "letting a state see later steps")
    pooling = cfg.pooling or ("last" if causal else "mean")
    if causal and pooling != "last":
        fail("pooling", f"{cfg.backbone} is causal: its state is read at the step-end token (pooling last)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if not causal and max_pos is not None and cfg.max_length > max_pos:
        fail("max_length", f"{cfg.max_length} exceeds {cfg.backbone}'s {max_pos} positions")
    n_shards = math.ceil(len(trajs) / cfg.shard_size)
    settings = {
        "format": FORMAT, "backbone": cfg.backbone, "backbone_fingerprint": _backbone_fingerprint(cfg.backbone),
        "model_type": model.config.model_type, "num_hidden_layers": n_layers,
        "hidden_size": model.config.hidden_size, "causal": causal, "pooling": pooling,
        "tokenizer": cfg.tokenizer or cfg.backbone, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "max_length": cfg.max_length, "layers": sorted(cfg.layers), "sequence_layers": sorted(cfg.sequence_layers),
        "reference_logprobs": cfg.reference_logprobs, "dtype": cfg.dtype, "sequence_dtype": cfg.sequence_dtype,
        "model_dtype": cfg.model_dtype, "inputs": inputs, "max_trajectories": cfg.max_trajectories,
        "inputs_summary": ", ".join(i["path"] for i in inputs), "shard_size": cfg.shard_size,
        "num_shards": n_shards, "trajectories": len(trajs),
    }
    out = Path(cfg.out)
    manifest = _prepare_out(out, settings, cfg.overwrite)
    done = {s["file"] for s in manifest["shards"]}
    names = ([states_key(lay) for lay in sorted(cfg.layers)] + [tokens_key(lay) for lay in sorted(cfg.sequence_layers)]
             + (["ref_logprobs"] if cfg.reference_logprobs else []))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    new = 0
    for k in range(n_shards):
        if shard_name(k) in done and (out / shard_name(k)).exists():
            continue
        if cfg.limit is not None and new >= cfg.limit:
            break
        t0 = time.perf_counter()
        items = [tokenize_trajectory(tok, t, cfg.max_length) for t in trajs[k * cfg.shard_size : (k + 1) * cfg.shard_size]]
        t_tok = time.perf_counter() - t0
        outputs = (causal_outputs(model, items, cfg, pad) if causal
                   else encoder_outputs(model, items, cfg, pad, pooling))
        entry = write_shard(out / shard_name(k), items, outputs, names)
        seconds = time.perf_counter() - t0
        entry.update(seconds=round(seconds, 3), tokenize_seconds=round(t_tok, 3))
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] != entry["file"]] + [entry]
        manifest["shards"].sort(key=lambda s: s["file"])
        write_json_atomic(out / MANIFEST, manifest)
        new += 1
        if cfg.progress:
            rate = entry["states"] / seconds
            print(f"precompute: shard {k + 1}/{n_shards}: {entry['trajectories']} trajectories, {entry['states']:,} "
                  f"states, {entry['tokens']:,} tokens in {entry['seconds']:.1f} s ({rate:.1f} states/s)",
                  file=sys.stderr, flush=True)
    shards = manifest["shards"]
    manifest["complete"] = len(shards) == n_shards
    secs = sum(s["seconds"] for s in shards)
    manifest["counts"] = {key: sum(s[key] for s in shards) for key in ("trajectories", "states", "tokens")}
    manifest["counts"]["seconds"] = round(secs, 3)
    manifest["counts"]["states_per_second"] = round(manifest["counts"]["states"] / secs, 2) if secs else None
    write_json_atomic(out / MANIFEST, manifest)
    return {**manifest["counts"], "complete": manifest["complete"], "shards_done": len(shards),
            "num_shards": n_shards, "new_shards": new, "out": str(out), "run_seconds": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (``python -m agentrm.precompute --help``)."""
    s = run_cli("agentrm.precompute",
                lambda a: precompute(parse_config(PrecomputeConfig, a, "agentrm.precompute")), argv)
    state = "complete" if s["complete"] else f"{s['shards_done']}/{s['num_shards']} shards (rerun to continue)"
    print(f"features {s['out']}: {state}; {s['trajectories']:,} trajectories, {s['states']:,} states, "
          f"{s['tokens']:,} tokens; this run {s['new_shards']} shards in {s['run_seconds']:.1f} s")
    return s


if __name__ == "__main__":
    main()
