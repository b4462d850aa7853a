"""Build or load the Hugging Face backbone of a reward model."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from agentrm.models.import_gguf import KNOWN_MODELS, resolve_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bf16"``/``"float32"``/... to a torch dtype (``None`` keeps the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def pick_attn_implementation(requested: str = "auto", device: str | torch.device | None = None) -> str:
    """``flash_attention_2`` when flash-attn is installed and the model goes to CUDA, else ``sdpa``.

    ``device`` is where the model will run (``None``: CUDA when available); ``auto`` never picks
    flash-attention for a CPU model on a GPU host. An explicit value (``"eager"``, ``"sdpa"``,
    ``"flash_attention_2"``) is returned as is, after checking that flash-attn is importable when asked for.
    """
    has_fa = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return "flash_attention_2" if (has_fa and on_cuda) else "sdpa"
    if requested == "flash_attention_2" and not has_fa:
        raise ImportError("attn_implementation='flash_attention_2' needs flash-attn: pip install 'agentrm[gpu]'")
    return requested


def build_backbone(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    vocab_size: int | None = None,
    causal_lm: bool = False,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "auto",
    quantization: str | None = None,
    device: str | torch.device | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load ``name_or_path`` (hub id, local dir or known model name) or build a random model from ``config``.

    A known name (:data:`agentrm.models.import_gguf.KNOWN_MODELS`, e.g. ``smollm2-135m-instruct``)
    loads its imported directory (imported once on first use) and keeps the name as the
    model's ``name_or_path``, so a LoRA adapter records the portable name, not a cache path.

    Args:
        config: a dict with ``model_type`` (e.g. ``"llama"``) and that architecture's
            fields; ``vocab_size`` is filled from the tokenizer when given.
        causal_lm: load with the LM head (implicit PRM, policy) or without (value RM).
        quantization: ``"nf4"`` (4-bit, double quant) or ``"int8"`` through bitsandbytes, on a CUDA GPU
            or the CPU, ``lm_head`` kept unquantised, compute in ``dtype`` (``None``: bf16 on CUDA, fp32
            on CPU); checked before anything is loaded (:class:`agentrm.models.quant.QuantizationUnavailable`
            without bitsandbytes or on another device type).
        device: where the model goes (``None``: left where it was built, CPU). A quantised load is
            placed on that device by ``device_map`` (``None``: ``cuda:<LOCAL_RANK>`` when CUDA is
            available, else the CPU); any other is moved there.
    A name or path is checked to be reachable (:func:`agentrm.paths.check_model_reachable`) before
    anything is fetched.
    """
    if quantization is not None:
        from agentrm.models.quant import check_quantization, quantization_device

        check_quantization(quantization, quantization_device(device))
        if config is not None:
            raise ValueError("quantization needs a pretrained checkpoint: save the config-built model "
                             "(save_pretrained) and load it by path")
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    attn = pick_attn_implementation(attn_implementation, device)
    torch_dtype = resolve_dtype(dtype)
    if config is not None:
        if name_or_path:
            raise ValueError("give either a backbone name/path or a backbone_config, not both")
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("backbone_config needs a 'model_type' field (e.g. 'llama')")
        if vocab_size is not None:
            cfg["vocab_size"] = vocab_size
        hf_config = AutoConfig.for_model(model_type, **cfg)
        hf_config._attn_implementation = attn
        model = auto.from_config(hf_config, attn_implementation=attn)
        model = model.to(torch_dtype) if torch_dtype is not None else model
        return model.to(device) if device is not None else model
    if not name_or_path:
        raise ValueError("a backbone name/path or a backbone_config is required")
    from agentrm.paths import check_model_reachable

    check_model_reachable(name_or_path)
    kwargs = dict(from_pretrained_kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if quantization is not None:
        from agentrm.models.quant import default_compute_dtype, quantization_device, quantized_load_kwargs

        # one dtype for the compute and the unquantised modules (embeddings, norms, lm_head)
        torch_dtype = torch_dtype or default_compute_dtype(quantization_device(device))
        kwargs = {"dtype": torch_dtype, **quantized_load_kwargs(quantization, torch_dtype, device), **kwargs}
    model = auto.from_pretrained(resolve_model(name_or_path), attn_implementation=attn, **kwargs)
    if quantization is not None:
        from agentrm.models.quant import own_unquantized_tensors

        own_unquantized_tensors(model)
    if name_or_path in KNOWN_MODELS:
        model.name_or_path = model.config._name_or_path = name_or_path
    if device is not None and quantization is None and "device_map" not in kwargs:
        model = model.to(device)
    return model
