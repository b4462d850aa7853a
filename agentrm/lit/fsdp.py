"""FSDP wrapping / activation-checkpointing policy for any Hugging Face decoder.

``configs/strategies/fsdp.yaml`` names :func:`decoder_layer_policy` as both
``auto_wrap_policy`` and ``activation_checkpointing_policy``, so one strategy file
serves every family (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``MistralDecoderLayer``...)
and composes with any model config.
"""

from __future__ import annotations

from torch import nn


def is_decoder_layer(module: nn.Module) -> bool:
    """True for a transformer block of a Hugging Face decoder (class name ends in ``DecoderLayer``)."""
    return type(module).__name__.endswith("DecoderLayer")


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
    """FSDP ``auto_wrap_policy`` signature: descend everywhere, wrap each decoder layer as one unit, and
    each model marked ``_agentrm_fsdp_unit`` (the implicit PRM's frozen reference, possibly in another
    dtype than the policy: FSDP1 flattens a unit's parameters together, which needs one dtype)."""
    if recurse:
        return True
    return is_decoder_layer(module) or bool(getattr(module, "_agentrm_fsdp_unit", False))
