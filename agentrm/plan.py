"""``python -m agentrm.plan --config CONFIG.yaml [--trainer.devices 8]``: estimate GPU memory per device.

Reads a fit config (several ``--config`` compose like in ``agentrm.fit``), the model's
architecture (a built-in table of well-known models, a local HF directory's
``config.json``, or the config's ``backbone_config``; never the hub) and prints, per
device: weights, gradients, optimizer states, a separate frozen reference (implicit PRM,
full training), activations and a fixed CUDA-context allowance; under FSDP also the host
memory each process needs while it builds the model, before FSDP shards it.

Given a search config (one with ``scorers:``, e.g. ``configs/search/llama3-8b_nf4.yaml``) it prints,
per locally loaded RM scorer: weights, a separate reference (implicit PRM), the prefix KV cache's
byte budget (``cache_bytes``, or the automatic one: :data:`agentrm.scoring.cache.AUTO_CUDA_FRACTION`
of the memory free on the GPU) and the keys/values of one scoring batch (see :func:`estimate_search`).

Accounting (bytes per parameter ``P``, ``N`` = devices x nodes):

* full, torch AMP (``bf16-mixed``, DDP/FSDP): fp32 weights 4P, fp32 grads 4P, AdamW m+v 8P
  (= 16P, the mixed-precision figure of the ZeRO paper); DeepSpeed bf16: bf16 weights 2P,
  grads 2P, fp32 master + m + v 12P.  DDP replicates all; ZeRO-2 shards grads+optimizer;
  FSDP / ZeRO-3 shard everything (FSDP adds one unsharded bf16 decoder layer in flight).
* LoRA: frozen base in its dtype (bf16: 2P) + fp32 adapters at 16 bytes/trainable param.
* implicit PRM, full training: the frozen reference is a submodule in ``reference_dtype`` (else the
  policy's ``dtype``): 2P in bf16, 4P in fp32; FSDP / ZeRO-3 shard it like the policy (FSDP adds one of
  its decoder layers gathered in flight), DDP / ZeRO-2 replicate it. With LoRA it is the base with the
  adapter disabled: no extra memory. It is read from the policy's weights path in its own dtype
  (:func:`agentrm.models.implicit_prm.load_reference`), so building it costs its own bytes, never an
  fp32 copy of the policy: under FSDP (Lightning builds the whole model on every rank's host before
  sharding) the host peak per process is the policy in ``dtype`` plus the reference in its dtype.
* QLoRA: linear layers in NF4 with double quantisation, 4 + 0.127 bits/param (QLoRA paper);
  the rest (embeddings, norms, ``lm_head``) upcast to fp32 by ``prepare_model_for_kbit_training``.
* activations per token per decoder layer, 16-bit, flash/SDPA attention (no ``s^2`` term):
  ``2*(7h + 3h_kv + 4I)`` bytes (norm inputs, q/k/v and rotated q/k, attention output,
  SwiGLU gate/up/act/product; after Korthikanti et al. 2022, adapted to GQA + SwiGLU);
  with activation checkpointing only each layer's input (2h) is kept, plus one layer's
  full activations during recomputation.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GB = 1e9
NF4_BYTES = (4 + 0.127) / 8  # QLoRA: 4-bit NF4 + 0.127 bits/param of double-quantised constants
CUDA_CONTEXT_GB = 1.0  # CUDA context + allocator slack, a rule of thumb


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only transformer (Llama-style: GQA attention, SwiGLU MLP)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each linear layer of one decoder layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear layers (what bitsandbytes quantises)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self, causal_lm: bool) -> int:
        """Embeddings, norms and (for a causal LM with untied embeddings) ``lm_head``."""
        emb = self.vocab * self.hidden
        head = emb if (causal_lm and not self.tied) else 0
        return emb + head + (2 * self.layers + 1) * self.hidden

    def params(self, causal_lm: bool) -> int:
        return self.linear_params() + self.other_params(causal_lm)

    def lora_params(self, r: int, targets: list[str] | None) -> int:
        shapes = self.linear_shapes()
        names = targets or ["q_proj", "v_proj"]
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names if n in shapes)

    def act_bytes_per_token_layer(self) -> int:
        return 2 * (7 * self.hidden + 3 * self.kv_dim + 4 * self.intermediate)


KNOWN: dict[str, Arch] = {}
for _names, _arch in [
    (
        (
            "meta-llama/Meta-Llama-3-8B",
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "meta-llama/Llama-3.1-8B",
            "meta-llama/Llama-3.1-8B-Instruct",
        ),
        Arch("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8),
    ),
    (
        (
            "meta-llama/Meta-Llama-3-70B",
            "meta-llama/Meta-Llama-3-70B-Instruct",
            "meta-llama/Llama-3.1-70B",
            "meta-llama/Llama-3.1-70B-Instruct",
        ),
        Arch("Llama-3-70B", 128256, 8192, 28672, 80, 64, 8),
    ),
    (("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"), Arch("Qwen2.5-7B", 152064, 3584, 18944, 28, 28, 4)),
]:
    for _n in _names:
        KNOWN[_n] = _arch


def arch_from_hf_config(cfg: dict[str, Any], name: str) -> Arch:
    """An :class:`Arch` from a ``config.json`` dict (or a ``backbone_config``)."""
    heads = cfg["num_attention_heads"]
    return Arch(
        name,
        cfg.get("vocab_size", 32000),
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        heads,
        cfg.get("num_key_value_heads") or heads,
        bool(cfg.get("tie_word_embeddings", False)),
    )


def resolve_arch(model_args: dict[str, Any]) -> Arch:
    """The built-in table, a local directory's ``config.json``, or ``backbone_config``; no hub access."""
    backbone = model_args.get("backbone")
    if backbone:
        if backbone in KNOWN:
            return KNOWN[backbone]
        cfg_file = Path(backbone) / "config.json"
        if cfg_file.exists():
            return arch_from_hf_config(json.loads(cfg_file.read_text()), backbone)
        raise ValueError(
            f"unknown backbone {backbone!r}: not a local directory with config.json and not "
            f"one of the built-in architectures {sorted(KNOWN)}"
        )
    if model_args.get("backbone_config"):
        return arch_from_hf_config(model_args["backbone_config"], "backbone_config")
    raise ValueError("the config has neither model.init_args.backbone nor backbone_config")


@dataclass
class Setup:
    """What the estimate depends on, read from a fit config."""

    arch: Arch
    causal_lm: bool  # implicit PRM (LM head) vs value RM (base model + value head)
    mode: str  # full | lora | qlora
    strategy: str  # ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_3 | single
    devices: int = 1
    precision: str = "bf16-mixed"
    dtype: str | None = "bfloat16"
    lora_r: int = 16
    lora_targets: list[str] | None = None
    batch_size: int = 1
    max_length: int = 2048
    checkpointing: bool = False
    separate_reference: bool = False
    reference_dtype: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Estimate:
    """GB (1e9 bytes) per device; ``host_build`` (GB per process while the model is built, before FSDP shards
    it) where that is the host peak, else ``None``."""

    rows: dict[str, float]
    params: int
    trainable: int
    host_build: float | None = None

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def model_states(self) -> float:
        """Weights + gradients + optimizer states (the part published per-parameter figures count)."""
        return self.rows["weights"] + self.rows["gradients"] + self.rows["optimizer states"]


def _dtype_bytes(dtype: str | None) -> int:
    return 4 if dtype in ("float32", "fp32") else 2


def estimate(s: Setup) -> Estimate:
    """Per-device memory for one training step of ``s``."""
    a, n = s.arch, max(1, s.devices)
    P = a.params(s.causal_lm) + (0 if s.causal_lm else a.hidden + 1)  # + value head
    shard_all = s.strategy in ("fsdp", "deepspeed_stage_3")
    shard_states = shard_all or s.strategy == "deepspeed_stage_2"
    if s.mode == "full":
        trainable = P
        host_weights = _dtype_bytes(s.dtype) * P
        if s.strategy.startswith("deepspeed"):
            w, g, o = 2 * P, 2 * P, 12 * P  # bf16 weights/grads, fp32 master + m + v
        else:
            wb = 4 if (s.precision.endswith("mixed") or _dtype_bytes(s.dtype) == 4) else 2
            w, g, o = wb * P, wb * P, 2 * wb * P
        w = w / n if shard_all else w
        g, o = (g / n, o / n) if shard_states else (g, o)
        if s.strategy == "fsdp":  # one decoder layer gathered in bf16 (+ prefetch of the next)
            w += 2 * 2 * a.linear_params() / a.layers
    else:
        trainable = a.lora_params(s.lora_r, s.lora_targets) + (0 if s.causal_lm else a.hidden + 1)
        if s.mode == "qlora":
            base = NF4_BYTES * a.linear_params() + 4 * (P - a.linear_params())
        else:
            base = _dtype_bytes(s.dtype) * P
        host_weights = base
        base = base / n if shard_all else base
        w, g, o = base + 4 * trainable, 4 * trainable, 8 * trainable
        g, o = (g / n, o / n) if shard_states else (g, o)
    ref, ref_whole = 0.0, 0.0
    if s.causal_lm and s.separate_reference:  # frozen submodule: sharded with the policy, or replicated
        ref_bytes = _dtype_bytes(s.reference_dtype or s.dtype)
        ref = ref_whole = ref_bytes * a.params(True)
        ref = ref / n if shard_all else ref
        if s.strategy == "fsdp":  # one of its decoder layers gathered in flight
            ref += ref_bytes * a.linear_params() / a.layers
    host = None
    if s.strategy == "fsdp":  # Lightning builds the whole model on each rank's host, then FSDP shards it
        host = (host_weights + ref_whole) / GB
    tokens = s.batch_size * s.max_length
    per_layer = tokens * a.act_bytes_per_token_layer()
    if s.checkpointing:
        act = a.layers * tokens * 2 * a.hidden + per_layer
    else:
        act = a.layers * per_layer
    act += tokens * a.hidden * 4  # final hidden states / chunked head outputs
    rows = {
        "weights": w / GB,
        "gradients": g / GB,
        "optimizer states": o / GB,
        "reference model": ref / GB,
        "activations": act / GB,
        "CUDA context (approx.)": CUDA_CONTEXT_GB,
    }
    return Estimate(rows, P, trainable, host)


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if (
            isinstance(v, dict)
            and isinstance(dst.get(k), dict)
            and not ("class_path" in v and v.get("class_path") != dst[k].get("class_path"))
        ):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _strategy_name(strategy: Any) -> str:
    if strategy is None or strategy == "auto":
        return "single"
    if isinstance(strategy, str):
        s = strategy.lower()
        if "deepspeed" in s:
            return "deepspeed_stage_3" if "3" in s else "deepspeed_stage_2"
        return "fsdp" if "fsdp" in s else "ddp"
    cls = strategy.get("class_path", "")
    if cls.endswith("FSDPStrategy"):
        return "fsdp"
    if cls.endswith("DeepSpeedStrategy"):
        return f"deepspeed_stage_{strategy.get('init_args', {}).get('stage', 2)}"
    return "ddp"


def setup_from_config(cfg: dict[str, Any]) -> Setup:
    """Read a (merged) fit config dict into a :class:`Setup`."""
    trainer, model, data = cfg.get("trainer", {}), cfg.get("model", {}), cfg.get("data", {})
    margs = model.get("init_args", {})
    devices = trainer.get("devices", 1)
    devices = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1
    n = devices * int(trainer.get("num_nodes", 1) or 1)
    strategy = _strategy_name(trainer.get("strategy"))
    if strategy == "single" and n > 1:
        strategy = "ddp"
    lora = margs.get("lora")
    mode = "qlora" if margs.get("quantization") else "lora" if lora else "full"
    causal = "prm" in model.get("class_path", "").lower()
    fsdp_ckpt = (
        strategy == "fsdp"
        and bool((trainer.get("strategy") or {}).get("init_args", {}).get("activation_checkpointing_policy"))
        if isinstance(trainer.get("strategy"), dict)
        else False
    )
    return Setup(
        arch=resolve_arch(margs),
        causal_lm=causal,
        mode=mode,
        strategy=strategy,
        devices=n,
        precision=str(trainer.get("precision", "32-true")),
        dtype=margs.get("dtype"),
        lora_r=int((lora or {}).get("r", 8)),
        lora_targets=(lora or {}).get("target_modules"),
        batch_size=int(data.get("batch_size", 8)),
        max_length=int(data.get("max_length", 1024)),
        checkpointing=bool(margs.get("gradient_checkpointing")) or fsdp_ckpt,
        separate_reference=causal and not lora,
        reference_dtype=margs.get("reference_dtype"),
    )


def load_config(paths: list[str], overrides: dict[str, str]) -> dict[str, Any]:
    """Merge ``--config`` files in order, then dotted ``--trainer.devices 8``-style overrides.

    Files are read with the YAML loader the CLIs use (jsonargparse's: it also takes the search configs'
    env specs such as ``[babyai:GoToLocal?max_steps=24]``, which strict YAML rejects)."""
    from jsonargparse import get_loader

    load_yaml = get_loader("yaml")
    cfg: dict[str, Any] = {}
    for p in paths:
        _merge(cfg, load_yaml(Path(p).read_text()) or {})
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return cfg


def format_table(s: Setup, e: Estimate) -> str:
    lines = [
        f"{s.arch.name}  {'implicit PRM' if s.causal_lm else 'value RM'}  mode={s.mode}  strategy={s.strategy}  "
        f"devices={s.devices}  precision={s.precision}",
        f"params {e.params / 1e9:.2f}B  trainable {e.trainable / 1e6:.1f}M  "
        f"micro-batch {s.batch_size} x {s.max_length} tokens  activation checkpointing={s.checkpointing}",
        f"{'component':26s} {'GB/device':>10s}",
    ]
    lines += [f"{k:26s} {v:10.2f}" for k, v in e.rows.items()]
    lines.append(f"{'total':26s} {e.total:10.2f}")
    for gpu, cap in (("A100/H100 80GB", 80), ("H200 141GB", 141)):
        lines.append(f"fits {gpu}: {'yes' if e.total <= 0.95 * cap else 'no'}")
    if e.host_build is not None:
        ref = " (the reference read from the weights in its own dtype)" if s.separate_reference else ""
        lines.append(f"host memory per process while building, before FSDP shards: {e.host_build:.2f} GB{ref}")
    return "\n".join(lines)


# ---- search time ---------------------------------------------------------------------------------


def kv_bytes_per_token(a: Arch, dtype_bytes: int = 2) -> int:
    """Keys + values of one token over every layer: ``2 * layers * kv_dim * bytes`` (Llama-3-8B, bf16: 128 KiB)."""
    return 2 * a.layers * a.kv_dim * dtype_bytes


@dataclass
class ScorerSetup:
    """A locally loaded RM scorer of a search config (``scorers[i]``), as far as memory goes."""

    name: str
    arch: Arch
    causal_lm: bool  # implicit PRM
    quantization: str | None
    dtype: str
    separate_reference: bool
    max_length: int
    batch_size: int
    cache_bytes: int | None  # None: automatic


def _scorer_arch(sc: dict[str, Any], where: str, override: str | None) -> tuple[Arch, dict[str, Any]]:
    """The architecture of a scorer's model (``--arch``, ``base``, or what its directory records) and the
    directory's ``agentrm_config.json`` (``{}`` when absent)."""
    path = Path(sc.get("path") or "")
    meta_file = path / "agentrm_config.json"
    meta = json.loads(meta_file.read_text()) if sc.get("path") and meta_file.exists() else {}
    names = [override, sc.get("base"), meta.get("base_model")]
    names = [n for n in names if n] + [str(d) for d in (path, path / "policy", path / "base") if sc.get("path")]
    for name in names:
        if name in KNOWN or (Path(name) / "config.json").exists():
            return resolve_arch({"backbone": name}), meta
        if (path / name / "config.json").exists():  # a base recorded relative to the directory
            return resolve_arch({"backbone": str(path / name)}), meta
    raise ValueError(f"{where}: cannot tell the architecture of {sc.get('path')!r} (not a local model directory, "
                     f"no known base); pass --arch NAME (one of {sorted(KNOWN)}) or a local model directory")


def search_setups(cfg: dict[str, Any], arch: str | None = None) -> list[ScorerSetup]:
    """The value-RM / implicit-PRM scorers of a search config (judges and oracles load no RM)."""
    from agentrm.search.specs import ScorerSpec

    defaults = ScorerSpec()
    out = []
    for i, sc in enumerate(cfg.get("scorers") or []):
        kind = sc.get("kind", defaults.kind)
        if kind not in ("value_rm", "implicit_prm"):
            continue
        where = f"scorers[{i}] ({sc.get('name') or kind})"
        a, meta = _scorer_arch(sc, where, arch)
        prm = kind == "implicit_prm"
        separate = meta.get("reference", "adapter_disabled" if sc.get("base") else "separate") == "separate"
        max_length = sc.get("max_length", defaults.max_length) or meta.get("max_length") or 4096
        from agentrm.scoring.cache import parse_bytes

        out.append(ScorerSetup(
            name=sc.get("name") or kind, arch=a, causal_lm=prm, quantization=sc.get("quantization"),
            dtype=sc.get("dtype") or "bfloat16", separate_reference=prm and separate, max_length=int(max_length),
            batch_size=int(sc.get("batch_size", defaults.batch_size)),
            cache_bytes=parse_bytes(sc.get("cache_bytes", getattr(defaults, "cache_bytes", None)),
                                    f"{where}.cache_bytes"),
        ))
    return out


def rm_weight_bytes(a: Arch, causal_lm: bool, quantization: str | None, dtype: str) -> float:
    """Bytes of an RM's weights as loaded for search: nf4 (4.127 bits) / int8 decoder linears with everything
    else (embeddings, norms, value head, ``lm_head``) in the 16-bit compute dtype, or all in ``dtype``."""
    P = a.params(causal_lm) + (0 if causal_lm else a.hidden + 1)
    linear = a.linear_params()
    if quantization in ("nf4", "int8"):
        return (NF4_BYTES if quantization == "nf4" else 1) * linear + 2 * (P - linear)
    return _dtype_bytes(dtype) * P


def estimate_search(s: ScorerSetup, gpu_gb: float = 80.0, reserved_gb: float = 0.0) -> Estimate:
    """GPU memory of one RM scorer during beam search, on a ``gpu_gb`` GPU of which other processes (a policy
    server) hold ``reserved_gb``.

    * weights (and a separate reference for an implicit PRM, loaded the same way);
    * the keys/values of one scoring batch (transient): ``batch_size`` candidate rows, each against its
      prefix's past of up to ``max_length`` tokens (the per-candidate layout flash-attention takes; the
      per-prefix layout of sdpa/eager needs one row per beam instead), per cached model;
    * the prefix KV cache: its byte budget, ``cache_bytes`` or the automatic
      :data:`~agentrm.scoring.cache.AUTO_CUDA_FRACTION` of what is free when its first entry is stored
      (the GPU less the other processes, the weights, one scoring batch and the CUDA context);
    * the CUDA context allowance. Activations of the new tokens (a few per row) are negligible here.
    """
    from agentrm.scoring.cache import AUTO_CUDA_FRACTION

    models = 2 if s.causal_lm else 1
    weights = rm_weight_bytes(s.arch, s.causal_lm, s.quantization, s.dtype)
    ref = weights if s.separate_reference else 0.0
    batch = models * s.batch_size * s.max_length * kv_bytes_per_token(s.arch, _dtype_bytes(s.dtype))
    fixed = weights + ref + batch + CUDA_CONTEXT_GB * GB
    cache = s.cache_bytes if s.cache_bytes is not None else AUTO_CUDA_FRACTION * max(
        0.0, (gpu_gb - reserved_gb) * GB - fixed)
    rows = {
        "weights": weights / GB,
        "reference model": ref / GB,
        "scoring batch KV": batch / GB,
        "prefix KV cache": cache / GB,
        "CUDA context (approx.)": CUDA_CONTEXT_GB,
    }
    return Estimate(rows, s.arch.params(s.causal_lm), 0)


def format_search_table(s: ScorerSetup, e: Estimate, gpu_gb: float, reserved_gb: float) -> str:
    per_token = kv_bytes_per_token(s.arch, _dtype_bytes(s.dtype))
    budget = (f"cache_bytes={s.cache_bytes / 2**30:.2f} GiB" if s.cache_bytes is not None
              else "cache_bytes=auto (a quarter of the memory free at its first store)")
    lines = [
        f"{s.arch.name}  {'implicit PRM' if s.causal_lm else 'value RM'}  scorer={s.name}  "
        f"quantization={s.quantization}  dtype={s.dtype}  {budget}",
        f"KV per token {per_token / 2**10:.1f} KiB; scoring batch {s.batch_size} rows x {s.max_length} tokens; "
        f"{gpu_gb:g} GB GPU, {reserved_gb:g} GB of it held by other processes",
        f"{'component':26s} {'GB/device':>10s}",
    ]
    lines += [f"{k:26s} {v:10.2f}" for k, v in e.rows.items()]
    lines.append(f"{'total':26s} {e.total:10.2f}")
    cache_tokens = e.rows["prefix KV cache"] * GB / (per_token * (2 if s.causal_lm else 1))
    lines.append(f"the prefix cache holds ~{cache_tokens:,.0f} tokens of keys/values "
                 f"(~{cache_tokens / s.max_length:.1f} prefixes of {s.max_length} tokens)")
    lines.append(f"fits beside the other processes: {'yes' if e.total <= 0.95 * (gpu_gb - reserved_gb) else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Estimate]:
    parser = argparse.ArgumentParser(
        prog="python -m agentrm.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", action="append", required=True,
                        help="fit config(s), composed in order, or a search config (one with scorers:)")
    parser.add_argument("--arch", help="search: the RM's architecture when its directory is not here "
                                       f"(one of {sorted(KNOWN)} or a local model directory)")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="search: the GPU's memory (default 80)")
    parser.add_argument("--reserved-gb", type=float, default=0.0,
                        help="search: GB of that GPU held by other processes, e.g. a policy server (default 0)")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    it = iter(rest)
    for tok in it:
        if not tok.startswith("--"):
            parser.error(f"unexpected argument {tok!r}")
        key, _, value = tok[2:].partition("=")
        overrides[key] = value if _ else next(it)
    cfg = load_config(args.config, overrides)
    try:
        if "scorers" in cfg:
            out = [(sc, estimate_search(sc, args.gpu_gb, args.reserved_gb)) for sc in search_setups(cfg, args.arch)]
            print("\n\n".join(format_search_table(sc, e, args.gpu_gb, args.reserved_gb) for sc, e in out)
                  or "no value-RM or implicit-PRM scorer in the config: no RM loaded on a GPU to plan")
            return [e for _, e in out]
        setup = setup_from_config(cfg)
    except ValueError as e:
        parser.exit(2, f"python -m agentrm.plan: error: {', '.join(args.config)}: {e}\n")
    est = estimate(setup)
    print(format_table(setup, est))
    return [est]


if __name__ == "__main__":
    main()
