"""Run a head's fused computation *as that head's forward*, so sharded weights are gathered for it.

The log-ratio and value-head kernels take a head's weight as a plain tensor. Under sharding strategies a
weight is only whole while its module runs:

* DeepSpeed ZeRO-3 gathers a module's own parameters in a forward pre-hook of that module and releases
  them after it (outside, ``weight`` is an empty placeholder), and re-gathers them for backward through
  hooks on the module's outputs;
* FSDP2 (``fully_shard``) swaps the unsharded parameters in around the forward of each sharded module
  (outside, ``weight`` is a ``DTensor`` shard); FSDP1 does the same per wrapped unit.

Fused-loss libraries therefore compute the loss inside a module forward. :func:`call_as_forward` does
that for any module: it calls ``module(*args)`` with the module's ``forward`` temporarily replaced by the
computation, so every hook the strategy registered runs around it and the computation reads the gathered
weight. :func:`causal_lm_head` also runs it *inside* the causal LM's own forward (a forward hook on its
decoder), which covers strategies that gather the head with the unit that owns it (FSDP1 root unit,
FSDP2 root group) rather than with the head itself. No logits are computed beyond one position, and no
per-layer hidden states are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def _innermost(module: nn.Module) -> nn.Module:
    """The module itself, or the one an FSDP1 wrapper forwards to (its hooks run, then this one's forward)."""
    return getattr(module, "_fsdp_wrapped_module", module)


def call_as_forward(module: nn.Module, fn: Callable[..., T], *args: Any) -> T:
    """``fn(owner, *args)`` computed as ``module(*args)``'s forward, where ``owner`` holds the weights.

    Args:
        module: the head (``lm_head``, value head), possibly wrapped by FSDP1.
        fn: reads the weights from its first argument (at call time, never before) and computes
            the result from the remaining ones.
        args: passed through ``module.__call__`` (so hooks see them; keep float tensors that must not be
            cast by a mixed-precision policy, such as reference log-probs, in ``fn``'s closure instead).
    """
    owner = _innermost(module)
    had_override = "forward" in owner.__dict__
    saved = owner.__dict__.get("forward")
    owner.forward = lambda *a: fn(owner, *a)
    try:
        return module(*args)
    finally:
        if had_override:
            owner.forward = saved
        else:
            del owner.forward


def _base(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_head(
    model: nn.Module, head_fn: Callable[[nn.Module, torch.Tensor], T] | None, **inputs: Any
) -> T | torch.Tensor:
    """Run causal LM ``model`` and compute ``head_fn(lm_head, last_hidden[B, T, H])`` inside its forward.

    The decoder's ``last_hidden_state`` (after the final norm) is taken from a forward hook on the
    decoder; the LM itself computes logits for the last position only (``logits_to_keep=1``).

    Args:
        model: a Hugging Face causal LM (optionally peft-wrapped).
        head_fn: computation on the output-embedding module and the hidden states, run through
            :func:`call_as_forward` on the LM head; ``None`` returns the hidden states themselves.
        inputs: model inputs (``input_ids``, ``attention_mask``, ``position_ids``...).

    Returns:
        ``head_fn``'s result, or ``[B, T, H]`` hidden states when ``head_fn`` is ``None``.
    """
    base = _base(model)
    decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    box: dict[str, Any] = {}

    def on_decoder_output(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        box["out"] = hidden if head_fn is None else call_as_forward(lm_head, head_fn, hidden)

    handle = decoder.register_forward_hook(on_decoder_output)
    try:
        model(**{"use_cache": False, **inputs}, logits_to_keep=1)
    finally:
        handle.remove()
    if "out" not in box:
        raise RuntimeError(f"{type(decoder).__name__} did not run inside {type(model).__name__}'s forward")
    return box["out"]


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any):
    """``[B, T, H]`` hidden states after the final norm, without logits for all tokens (see above)."""
    return causal_lm_head(model, None, input_ids=input_ids, attention_mask=attention_mask, **inputs)
