"""GPU memory of training and scoring a reward model, from the model's shape: the planner's arithmetic.

:func:`estimate` (one training step: weights, gradients, optimizer states, a frozen reference, activations) and
:func:`estimate_search` (one RM scorer during beam search: weights, the scoring batch's keys/values, the prefix
cache's byte budget) per device, in GB; the accounting is documented in :mod:`agentrm.plan`, which reads configs
into :class:`Setup` / :class:`ScorerSetup` and prints the tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def lora_params(self, r: int, targets: list[str] | str | None) -> int:
        """Adapter parameters of rank ``r`` on ``targets`` (names, peft's ``"all-linear"``, or peft's default q/v)."""
        shapes = self.linear_shapes()
        names = list(shapes) if targets == "all-linear" else targets or ["q_proj", "v_proj"]
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
    lora_targets: list[str] | str | None = None
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


def rm_weight_bytes(a: Arch, causal_lm: bool, quantization: str | None, dtype: str) -> float:
    """Bytes of an RM's weights as loaded for search: nf4 (4.127 bits) / int8 decoder linears with everything
    else (embeddings, norms, value head, ``lm_head``) in the 16-bit compute dtype, or all in ``dtype``."""
    P = a.params(causal_lm) + (0 if causal_lm else a.hidden + 1)
    linear = a.linear_params()
    if quantization in ("nf4", "int8"):
        return (NF4_BYTES if quantization == "nf4" else 1) * linear + 2 * (P - linear)
    return _dtype_bytes(dtype) * P


def estimate_search(s: ScorerSetup, gpu_gb: float = 80.0, reserved_gb: float = 0.0,
                    auto_cache_fraction: float = 0.25) -> Estimate:
    """GPU memory of one RM scorer during beam search, on a ``gpu_gb`` GPU of which other processes (a policy
    server) hold ``reserved_gb``.

    * weights (and a separate reference for an implicit PRM, loaded the same way);
    * the keys/values of one scoring batch (transient): ``batch_size`` candidate rows, each against its
      prefix's past of up to ``max_length`` tokens (the per-candidate layout flash-attention takes; the
      per-prefix layout of sdpa/eager needs one row per beam instead), per cached model;
    * the prefix KV cache: its byte budget, ``cache_bytes`` or the automatic
      ``auto_cache_fraction`` (the scorer's :data:`~agentrm.scoring.cache.AUTO_CUDA_FRACTION`) of what is free
      when its first entry is stored
      (the GPU less the other processes, the weights, one scoring batch and the CUDA context);
    * the CUDA context allowance. Activations of the new tokens (a few per row) are negligible here.
    """
    models = 2 if s.causal_lm else 1
    weights = rm_weight_bytes(s.arch, s.causal_lm, s.quantization, s.dtype)
    ref = weights if s.separate_reference else 0.0
    batch = models * s.batch_size * s.max_length * kv_bytes_per_token(s.arch, _dtype_bytes(s.dtype))
    fixed = weights + ref + batch + CUDA_CONTEXT_GB * GB
    cache = s.cache_bytes if s.cache_bytes is not None else auto_cache_fraction * max(
        0.0, (gpu_gb - reserved_gb) * GB - fixed)
    rows = {
        "weights": weights / GB,
        "reference model": ref / GB,
        "scoring batch KV": batch / GB,
        "prefix KV cache": cache / GB,
        "CUDA context (approx.)": CUDA_CONTEXT_GB,
    }
    return Estimate(rows, s.arch.params(s.causal_lm), 0)
