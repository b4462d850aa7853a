"""4-bit / 8-bit loading through bitsandbytes, and early checks of unsupported combinations.

Everything here fails *before* a model is loaded: asking for ``quantization="nf4"`` on
a machine without CUDA or without bitsandbytes raises :class:`QuantizationUnavailable`
naming the fix, and :func:`validate_training_setup` rejects combinations that cannot
train (quantised weights without a LoRA adapter, quantised weights under a sharding
strategy such as FSDP or DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

QUANTIZATIONS = ("nf4", "int8")
# Modules kept in full precision: the LM head (log-probs of the implicit PRM, and tied
# embeddings), and our value head (it lives outside the HF model, listed for clarity).
SKIP_MODULES = ["lm_head", "value_head", "score"]
# Strategies that shard parameters: bitsandbytes' packed 4-bit/8-bit tensors cannot be
# flattened and sharded by them in this trainer.
SHARDING_STRATEGIES = ("fsdp", "deepspeed_stage_3", "deepspeed_zero3", "zero3")


class QuantizationUnavailable(RuntimeError):
    """Quantised loading was asked for on a machine that cannot do it (no CUDA / no bitsandbytes)."""


class UnsupportedTrainingSetup(ValueError):
    """A combination of quantisation, LoRA and strategy that this trainer cannot train."""


def check_quantization(quantization: str | None) -> None:
    """Raise at once if ``quantization`` is unknown or cannot run here; ``None`` always passes.

    Raises:
        ValueError: unknown scheme.
        QuantizationUnavailable: CUDA missing or bitsandbytes not installed.
    """
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    if not torch.cuda.is_available():
        raise QuantizationUnavailable(
            f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes 4-bit/8-bit kernels); "
            "none is visible. Drop the `quantization` option (to train, use the *_lora.yaml config) "
            "or run on a GPU machine."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed: "
            "pip install 'agentrm[quant]' (or 'agentrm[gpu]')."
        )


def bnb_config(quantization: str, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """A ``transformers.BitsAndBytesConfig``: nf4 + double quantisation + bf16 compute, or LLM.int8.

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


def quantized_load_kwargs(
    quantization: str, compute_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> dict[str, Any]:
    """``from_pretrained`` kwargs for a quantised load on ``device`` (``None``: this process's GPU, ``LOCAL_RANK``)."""
    import os

    check_quantization(quantization)
    if device is None:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"quantization={quantization!r} loads onto a CUDA device, got device={str(dev)!r}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    return {
        "quantization_config": bnb_config(quantization, compute_dtype or torch.bfloat16),
        "device_map": {"": index},
    }


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
            "full-parameter. Add a `lora:` section (QLoRA, see configs/llama3-8b/value_rm_qlora.yaml) "
            "or drop `quantization`."
        )
    name = strategy_name(strategy)
    if any(s in name for s in SHARDING_STRATEGIES):
        raise UnsupportedTrainingSetup(
            f"quantization={quantization!r} with strategy {name!r}: 4-bit/8-bit weights cannot be sharded "
            "by FSDP/ZeRO-3 in this trainer. Run QLoRA on one GPU or with --trainer.strategy ddp; for "
            "full-parameter training use the *_full.yaml config (bf16, FSDP) without quantization."
        )
