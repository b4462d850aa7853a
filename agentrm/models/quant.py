"""4-bit / 8-bit loading through bitsandbytes on CUDA or CPU, and early checks of unsupported combinations.

bitsandbytes (a normal dependency) has a CUDA backend and, from 0.48, a CPU backend: ``nf4`` and
``int8`` weights load and run forward and backward (QLoRA) on either. Everything here fails *before*
a model is loaded: an unknown scheme, a device bitsandbytes has no backend for here, or bitsandbytes
missing/too old raises (:class:`QuantizationUnavailable` naming the fix), and
:func:`validate_training_setup` rejects combinations that cannot train (quantised weights without a
LoRA adapter, quantised weights under a sharding strategy such as FSDP or DeepSpeed ZeRO-3).

Compute dtype (``bnb_4bit_compute_dtype``; the unquantised modules, embeddings, norms, ``lm_head``,
are kept in it too): the model's ``dtype``, by default bf16 on CUDA and fp32 on the CPU. Both work on the
CPU; bf16 was faster there (``bench/bench_quant.py``: nf4 forward 0.63x fp32's time with bf16 compute, 0.78x
with fp32) on a CPU with AVX512-BF16, but CPUs without it emulate bf16 matmuls, so fp32 stays the default.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from typing import Any

import torch

QUANTIZATIONS = ("nf4", "int8")
# Modules kept in full precision: the LM head (log-probs of the implicit PRM, and tied
# embeddings), and our value head (it lives outside the HF model, listed for clarity).
SKIP_MODULES = ["lm_head", "value_head", "score"]
# Strategies that shard parameters: bitsandbytes' packed 4-bit/8-bit tensors cannot be
# flattened and sharded by them in this trainer.
SHARDING_STRATEGIES = ("fsdp", "deepspeed_stage_3", "deepspeed_zero3", "zero3")
# Device types bitsandbytes has a backend for that this project tests (CPU in CI, CUDA in tests/gpu).
QUANT_DEVICE_TYPES = ("cuda", "cpu")
# The first bitsandbytes release whose CPU backend loads and runs nf4/int8 through transformers
# (0.48.2, 0.49.2 and 0.50.2 checked: forward + a LoRA backward step).
MIN_BNB_CPU = (0, 48)
BNB_PIN = "bitsandbytes>=0.48,<0.51"


class QuantizationUnavailable(RuntimeError):
    """Quantised loading was asked for where it cannot run (bitsandbytes missing or too old, unsupported device)."""


class UnsupportedTrainingSetup(ValueError):
    """A combination of quantisation, LoRA and strategy that this trainer cannot train."""


def _bnb_version() -> tuple[int, ...] | None:
    """bitsandbytes' ``(major, minor)`` if installed, else ``None``."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        parts = importlib.metadata.version("bitsandbytes").split(".")[:2]
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)
    except importlib.metadata.PackageNotFoundError:  # importable but without metadata (a source tree)
        return MIN_BNB_CPU


def quantization_device(device: str | torch.device | None = None) -> torch.device:
    """Where a quantised load goes: ``device``, or (``None``) ``cuda:<LOCAL_RANK>`` with CUDA, else ``cpu``."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_quantization(quantization: str | None, device: str | torch.device | None = None) -> None:
    """Raise at once if ``quantization`` is unknown or cannot run on ``device``; ``None`` always passes.

    Args:
        device: where the quantised model will go (``None``: :func:`quantization_device`'s default).

    Raises:
        ValueError: unknown scheme.
        QuantizationUnavailable: bitsandbytes missing (or too old for its CPU backend), or a
            device type other than CUDA/CPU.
    """
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    dev = torch.device(device) if device is not None else quantization_device()
    if dev.type not in QUANT_DEVICE_TYPES:
        raise QuantizationUnavailable(
            f"quantization={quantization!r} runs on a CUDA GPU or the CPU (bitsandbytes), not on "
            f"device={str(dev)!r}; set the device to cpu or cuda:N, or drop quantization"
        )
    version = _bnb_version()
    if version is None:
        raise QuantizationUnavailable(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed (it is a dependency "
            f"of agentrm): pip install -c constraints.txt '{BNB_PIN}'"
        )
    if dev.type == "cpu" and version < MIN_BNB_CPU:
        found = ".".join(map(str, version))
        raise QuantizationUnavailable(
            f"quantization={quantization!r} on the CPU needs bitsandbytes >= "
            f"{'.'.join(map(str, MIN_BNB_CPU))} (its CPU backend), found {found}: "
            f"pip install -c constraints.txt '{BNB_PIN}'"
        )


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on the CPU (bf16 pays only on CPUs with bf16 instructions, see the module doc)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def bnb_config(quantization: str, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """A ``transformers.BitsAndBytesConfig``: nf4 + double quantisation + ``compute_dtype`` compute, or LLM.int8.

    ``lm_head`` and the value head are kept unquantised (``llm_int8_skip_modules``).
    """
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(SKIP_MODULES),
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


class _OnceFilter(logging.Filter):
    """Let a log message through the first time only (bitsandbytes' int8 matmul warns on every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _warn_once_for_int8_casts() -> None:
    """LLM.int8 logs "inputs will be cast ... to float16" on every forward of every layer; keep the first."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in log.filters):
        log.addFilter(_OnceFilter())


def quantized_load_kwargs(
    quantization: str, compute_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> dict[str, Any]:
    """``from_pretrained`` kwargs for a quantised load on ``device``.

    Args:
        compute_dtype: bitsandbytes' compute dtype (``None``: :func:`default_compute_dtype`).
        device: ``None``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    Returns:
        ``quantization_config`` and ``device_map`` (``{"": <cuda index>}`` or ``{"": "cpu"}``).
    """
    dev = quantization_device(device)
    check_quantization(quantization, dev)
    if quantization == "int8":
        _warn_once_for_int8_casts()
    return {
        "quantization_config": bnb_config(quantization, compute_dtype or default_compute_dtype(dev)),
        "device_map": {"": dev.index if dev.type == "cuda" else "cpu"},
    }


def own_unquantized_tensors(model: torch.nn.Module) -> int:
    """Copy the unquantised CPU tensors of a quantised model out of the checkpoint's memory map; returns bytes copied.

    ``from_pretrained`` leaves tensors whose dtype it did not change (embeddings, norms, ``lm_head`` in
    the checkpoint's dtype) as views of the memory-mapped ``model.safetensors``; one such view keeps the
    whole file mapped, so every page read while quantising stays resident (SmolLM2-135M in nf4 with fp32
    compute: ~600 MB RSS instead of ~200 MB, more than the fp32 model). Tied weights stay tied (the
    ``Parameter`` objects are kept, only their data is replaced). Quantised weights and GPU tensors are
    left alone.
    """
    copied = 0
    for p in (*model.parameters(), *model.buffers()):
        if p.device.type != "cpu" or not p.dtype.is_floating_point:  # packed 4-bit/8-bit weights are integers
            continue
        p.data = p.data.clone()
        copied += p.numel() * p.element_size()
    return copied


def strategy_name(strategy: Any) -> str:
    """A lower-case name for a Lightning strategy given as a string or an instance."""
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy.lower()
    name = type(strategy).__name__.lower()
    if name.startswith("deepspeed"):
        stage = getattr(strategy, "config", {}) or {}
        zero = stage.get("zero_optimization", {}).get("stage") if isinstance(stage, dict) else None
        return f"deepspeed_stage_{zero}" if zero is not None else "deepspeed"
    return name.replace("strategy", "")


def validate_training_setup(
    quantization: str | None, lora: dict[str, Any] | None, strategy: Any = None
) -> None:
    """Reject untrainable combinations early, with a message that says what to change.

    * quantised weights need a LoRA adapter (QLoRA): full-parameter training of
      4-bit/8-bit weights is not possible;
    * quantised weights cannot be sharded by FSDP / DeepSpeed ZeRO-3: use one GPU or DDP.

    Raises:
        UnsupportedTrainingSetup
    """
    if quantization is None:
        return
    if not lora:
        raise UnsupportedTrainingSetup(
            f"quantization={quantization!r} without a LoRA adapter: quantised weights cannot be trained "
            "full-parameter. Add a `lora:` section (QLoRA, see configs/recipes/qlora.yaml) "
            "or drop `quantization`."
        )
    name = strategy_name(strategy)
    if any(s in name for s in SHARDING_STRATEGIES):
        raise UnsupportedTrainingSetup(
            f"quantization={quantization!r} with strategy {name!r}: 4-bit/8-bit weights cannot be sharded "
            "by FSDP/ZeRO-3 in this trainer. Run QLoRA on one GPU or with --trainer.strategy ddp; for "
            "full-parameter training use the *_full.yaml config (bf16, FSDP) without quantization."
        )
