"""Layer-level access to a transformer backbone: hidden states of chosen layers, truncation, the top layers alone.

Frozen-backbone reward models (:mod:`agentrm.precompute`) cache what the lower layers compute once and train
only what sits above. Three operations make that exact:

* :func:`layer_states` runs the backbone up to the highest requested layer only and returns, for each layer
  ``l`` (1-based: the output of block ``l``), the hidden states **the backbone truncated to ``l`` blocks would
  return as its last hidden state**: for a decoder (LLaMA, Gemma 3, ...) the final norm applied to the
  residual stream after block ``l``; for an encoder without a final norm (BERT) the block's output itself;
* :func:`truncate_backbone` drops the blocks above ``l`` (config updated, per-layer attention types kept), so
  an exported value RM built on it reads exactly the cached features (``last_hidden_state == layer_states[l]``);
* :func:`top_layers_model` turns a decoder into the model of its blocks ``l+1..N`` fed with the cached
  residual stream after block ``l`` (``inputs_embeds``), which equals the full model's forward there.

Supported: decoder-only models whose base keeps its blocks in ``layers`` and a final ``norm`` (LLaMA/SmolLM2,
Gemma 3, Qwen2, Mistral...) and BERT-style encoders (``encoder.layer``, no final norm). Anything else raises
:class:`UnsupportedBackbone` naming the model class.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


class UnsupportedBackbone(ValueError):
    """The backbone's blocks cannot be located (neither ``layers`` + ``norm`` nor ``encoder.layer``)."""


def base_of(model: nn.Module) -> nn.Module:
    """The module that owns the blocks: under a peft wrapper, a ``*ForCausalLM``'s decoder, or the model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not hasattr(model, "layers") and not hasattr(getattr(model, "encoder", None), "layer"):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        if decoder is not None and decoder is not model:
            return base_of(decoder)
    return model


def _holder(model: nn.Module) -> tuple[nn.Module, str]:
    """``(module, attribute)`` holding the ``ModuleList`` of blocks."""
    base = base_of(model)
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base, "layers"
    encoder = getattr(base, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder, "layer"
    raise UnsupportedBackbone(f"{type(model).__name__}: its transformer blocks are neither in .layers (decoder) "
                              "nor in .encoder.layer (BERT-style encoder)")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The backbone's transformer blocks, lowest first."""
    holder, attr = _holder(model)
    return getattr(holder, attr)


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a decoder applies after its last block (``None`` for an encoder: its blocks end in a norm)."""
    holder, attr = _holder(model)
    return getattr(holder, "norm", None) if attr == "layers" else None


def is_decoder_stack(model: nn.Module) -> bool:
    """Blocks in ``.layers`` under a final ``norm`` (a decoder-only LM), as opposed to a BERT-style encoder."""
    return _holder(model)[1] == "layers"


def check_layers(model: nn.Module, layers: list[int], field: str = "layers") -> None:
    """Every ``l`` in ``layers`` is a block index in ``1..N``."""
    n = num_layers(model)
    bad = [layer for layer in layers if not 1 <= int(layer) <= n]
    if bad or not layers:
        raise ValueError(f"{field}: {bad or layers} out of range: {type(base_of(model)).__name__} has blocks 1..{n}")


def _set_block_count(model: nn.Module, n: int) -> None:
    """Keep the first ``n`` blocks and make the config say so (``layer_types`` cut to match)."""
    holder, attr = _holder(model)
    setattr(holder, attr, nn.ModuleList(list(getattr(holder, attr))[:n]))
    for cfg in {id(c): c for c in (getattr(model, "config", None), getattr(base_of(model), "config", None))
                if c is not None}.values():
        cfg.num_hidden_layers = n
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[:n]


@contextlib.contextmanager
def running_blocks(model: nn.Module, n: int) -> Iterator[None]:
    """Within the block, ``model`` runs its first ``n`` blocks only (the rest are skipped, not computed)."""
    holder, attr = _holder(model)
    saved = getattr(holder, attr)
    configs = {id(c): c for c in (getattr(model, "config", None), getattr(base_of(model), "config", None))
               if c is not None}.values()
    saved_cfg = [(c, c.num_hidden_layers, getattr(c, "layer_types", None)) for c in configs]
    try:
        _set_block_count(model, n)
        yield
    finally:
        setattr(holder, attr, saved)
        for c, count, types in saved_cfg:
            c.num_hidden_layers = count
            if types is not None:
                c.layer_types = types


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture_blocks(model: nn.Module, wanted: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward of ``model`` stores the output of block ``l`` (1-based) for ``l`` in
    ``wanted`` into the yielded dict (the residual stream after block ``l``, no norm)."""
    if wanted:
        check_layers(model, list(wanted))
    block_list = blocks(model)
    box: dict[int, torch.Tensor] = {}
    handles = [block_list[i - 1].register_forward_hook(
        lambda _m, _a, out, i=i: box.__setitem__(i, _block_output(out))) for i in sorted(set(wanted))]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


def states_from_blocks(model: nn.Module, box: dict[int, torch.Tensor], layers: list[int],
                       raw: list[int] | None = None) -> dict[int, torch.Tensor]:
    """What :func:`layer_states` returns, from block outputs captured by :func:`capture_blocks`."""
    norm = final_norm(model)
    out = {i: norm(box[i]) if norm is not None else box[i] for i in layers}
    out.update({-i: box[i] for i in raw or []})
    return out


@torch.no_grad()
def layer_states(model: nn.Module, layers: list[int], raw: list[int] | None = None, **inputs) -> dict[int, torch.Tensor]:
    """Hidden states ``[B, T, H]`` of each layer in ``layers`` (and residual streams of ``raw``), one forward.

    Only the blocks up to ``max(layers + raw)`` run. ``layers[l]`` is what the backbone truncated to ``l`` blocks
    returns as ``last_hidden_state`` (final norm applied for a decoder); ``raw`` layers are returned as the
    residual stream after block ``l`` (no norm: what block ``l+1`` takes as input, see :func:`top_layers_model`)
    under the key ``-l``.

    Args:
        model: a Hugging Face base model or causal LM (its decoder is used).
        inputs: ``input_ids``, ``attention_mask`` (and any other argument of the base model's forward).
    """
    raw = list(raw or [])
    wanted = sorted(set(layers) | set(raw))
    with capture_blocks(model, wanted) as box, running_blocks(model, max(wanted)):
        base_of(model)(**{"use_cache": False, **inputs})
    return states_from_blocks(model, box, layers, raw)


def truncate_backbone(model: nn.Module, n: int) -> nn.Module:
    """Drop the blocks above ``n`` in place (config updated); returns ``model``.

    Its ``last_hidden_state`` then equals :func:`layer_states` ``[n]`` of the full model, and it saves and
    reloads as an ordinary model of ``n`` layers.
    """
    check_layers(model, [n], "layer")
    _set_block_count(model, n)
    return model


def top_layers_model(model: nn.Module, start: int) -> nn.Module:
    """Turn decoder ``model`` (in place) into its blocks ``start+1..N`` fed with ``inputs_embeds``.

    Call it as ``model(inputs_embeds=h, attention_mask=m)`` with ``h [B, T, H]`` the residual stream after
    block ``start`` (:func:`layer_states` ``raw=[start]``) and the same mask (and default positions): the
    causal mask, rotary positions and per-layer attention types are rebuilt from the config exactly as the
    full model does, so ``last_hidden_state`` equals the full model's. The token embedding is replaced by a
    one-row stub (never used: the input is ``inputs_embeds``) to free its memory; the blocks below
    ``start`` are dropped.

    Raises:
        UnsupportedBackbone: an encoder (BERT adds position embeddings to whatever enters: no entry point
            between blocks) or a model without ``embed_tokens``.
    """
    if not is_decoder_stack(model):
        raise UnsupportedBackbone(f"{type(base_of(model)).__name__}: top-layer training needs a decoder-only model "
                                  "(an encoder re-embeds its input); use a head on cached features instead")
    n = num_layers(model)
    check_layers(model, [start], "layer")
    if start >= n:
        raise ValueError(f"layer: {start} leaves no block to train ({type(base_of(model)).__name__} has {n})")
    base = base_of(model)
    if not isinstance(getattr(base, "embed_tokens", None), nn.Module):
        raise UnsupportedBackbone(f"{type(base).__name__} has no embed_tokens to bypass")
    holder, attr = _holder(model)
    setattr(holder, attr, nn.ModuleList(list(getattr(holder, attr))[start:]))
    cfg = copy.deepcopy(base.config)
    cfg.num_hidden_layers = n - start
    cfg.use_cache = False  # the blocks keep their layer_idx (start+i): a KV cache would index past its end
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[start:]
    base.config = cfg
    if model is not base:
        model.config = cfg
    base.embed_tokens = nn.Embedding(1, base.embed_tokens.weight.shape[1]).requires_grad_(False)
    return model
