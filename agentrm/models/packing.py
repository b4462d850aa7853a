"""Custom attention masks for packed candidate scoring: which models take them, and in what form.

Packed scoring (:mod:`agentrm.scoring`) lays ``[prefix, cand_1, ..., cand_K]`` out in one row
and needs the model to use a given ``allowed[B, 1, T, T]`` mask (key in the prefix or in the
query's own candidate, causal) and given position ids.  In transformers 5.x a 4D mask is
passed to the attention kernel unchanged (``_preprocess_mask_arguments``: "If the mask is
already 4D, simply return as-is"):

* ``sdpa``: boolean, ``True`` = attend; ``eager``: additive float, ``0`` or ``finfo.min``.
* **Sliding-window layers** ignore their window when handed a ready 4D mask.  Gemma 3
  (``gemma3_text``: 5 sliding-window layers to 1 global) accepts a dict
  ``{"full_attention": m, "sliding_attention": m_sw}`` instead, so the sliding mask is built
  here: ``m_sw = allowed & (pos_q - pos_k < window)`` on the packed position ids, which restart
  at ``P`` for every candidate, so each candidate sees exactly the window it would see alone.
  Gemma 3 therefore packs exactly at any context length.
* Mistral / Qwen2 / Qwen3 with an *active* sliding window shorter than the context fall back
  to plain batching (their dict path is not vetted here); with no active window they pack.
* ``flash_attention_2`` / ``flex_attention`` and model types outside :data:`PACKABLE_MODEL_TYPES`
  fall back to plain batching.
"""

from __future__ import annotations

import torch
from torch import Tensor

PACKABLE_ATTENTION = ("sdpa", "eager")
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
LAYER_TYPE_MASK_MODEL_TYPES = ("gemma3_text",)
"""Model types that take ``{layer_type: mask}`` and get a sliding-window mask built here."""


def packing_unsupported_reason(config, context_len: int | None = None) -> str | None:
    """Why a model with HF ``config`` cannot take a packed custom mask (``None`` if it can).

    Args:
        context_len: the longest ``prefix + candidate``; for models without per-layer-type masks
            a sliding window shorter than it would be ignored by a custom mask, so packing is refused.
    """
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in PACKABLE_ATTENTION:
        return f"attn_implementation={attn!r} takes no custom 4D mask (packing needs one of {PACKABLE_ATTENTION})"
    mtype = getattr(config, "model_type", None)
    if mtype not in PACKABLE_MODEL_TYPES:
        return f"model_type={mtype!r} is not in the packing allow-list {PACKABLE_MODEL_TYPES}"
    if mtype in LAYER_TYPE_MASK_MODEL_TYPES:
        if getattr(config, "use_bidirectional_attention", False):
            return f"model_type={mtype!r} with use_bidirectional_attention is not causal"
        return None
    window = getattr(config, "sliding_window", None)
    if mtype in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        window = None
    if window is not None and (context_len is None or context_len > window):
        return f"sliding_window={window} is active and shorter than the context"
    return None


def _kernel_mask(allowed: Tensor, config, dtype: torch.dtype) -> Tensor:
    if getattr(config, "_attn_implementation", None) == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def packed_attention_mask(
    allowed: Tensor, position_ids: Tensor, config, dtype: torch.dtype
) -> Tensor | dict[str, Tensor]:
    """The ``attention_mask`` argument for a packed row.

    Args:
        allowed: ``[B, 1, T, T]`` bool, ``True`` where query ``t`` may attend key ``s``.
        position_ids: ``[B, T]`` packed positions (restarting at ``P`` per candidate).
        config: the model's HF config (attention implementation, model type, layer types, window).
        dtype: the model's dtype (for the additive eager mask).
    Returns:
        one 4D mask, or ``{"full_attention": m, "sliding_attention": m_sw}`` for the model types in
        :data:`LAYER_TYPE_MASK_MODEL_TYPES` that have sliding-window layers.
    """
    layer_types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if getattr(config, "model_type", None) in LAYER_TYPE_MASK_MODEL_TYPES and "sliding_attention" in layer_types:
        if window is None:
            raise ValueError("config has sliding_attention layers but no sliding_window")
        dist = position_ids[:, :, None] - position_ids[:, None, :]  # [B, T(query), T(key)]
        sliding = allowed & (dist < window)[:, None]
        masks = {"sliding_attention": _kernel_mask(sliding, config, dtype)}
        if "full_attention" in layer_types:
            masks["full_attention"] = _kernel_mask(allowed, config, dtype)
        return masks
    return _kernel_mask(allowed, config, dtype)
