"""Value RMs trained on cached forwards of a frozen backbone, and their export as ordinary value-RM directories.

Two models read a features directory (:mod:`agentrm.models.feature_cache`, written by ``python -m
agentrm.precompute``) instead of running the frozen part of the backbone:

* :class:`CachedFeatureHead`: a value head (linear or MLP) on the cached state of layer ``l`` at each step end.
  :func:`export_head_rm` writes it as a :class:`~agentrm.models.value_rm.ValueRewardModel` whose backbone is
  truncated to ``l`` blocks (the blocks above dropped: cheaper scoring) and whose head is the trained one, so
  every scorer, ``agentrm.serve`` and ``agentrm.search`` use it unchanged and read exactly the cached features;
* :class:`CachedTopLayersRM`: the blocks above layer ``l`` (optionally with LoRA) and a value head, fed with
  the cached residual stream after block ``l`` at every token; :func:`export_top_layers_rm` merges the
  adapter and writes the full backbone with the trained blocks in place.

Both take the ordinary batch of :class:`~agentrm.lit.datamodule.TrajectoryDataModule` (``input_ids``,
``attention_mask``, ``step_end_idx``) and find each row in the cache by its token ids, so the data module,
the split, the label checks and the validation metrics are those of the full fine-tune.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agentrm.models.backbone import build_backbone
from agentrm.models.feature_cache import FeatureCache, FeatureCacheError
from agentrm.models.fingerprint import model_fingerprint
from agentrm.models.layers import blocks, final_norm, num_layers, top_layers_model, truncate_backbone
from agentrm.models.value_rm import ValueRewardModel, make_value_head


def check_backbone_unchanged(manifest: dict[str, Any]) -> None:
    """The backbone the manifest names still has the fingerprint it had at precompute time.

    Raises:
        FeatureCacheError: it changed (re-imported, retrained): cached states would not match its layers.
    """
    from agentrm.models.import_gguf import resolve_model
    from agentrm.paths import resolve_path

    recorded = manifest.get("backbone_fingerprint", "")
    if recorded.startswith("hub:"):
        return
    now = model_fingerprint(resolve_path(resolve_model(manifest["backbone"])))
    if now != recorded:
        raise FeatureCacheError(f"backbone {manifest['backbone']!r} has fingerprint {now}, but the features were "
                                f"computed with {recorded}: rerun python -m agentrm.precompute")


class CachedFeatureHead(nn.Module):
    """A value head on cached step-end states of layer ``layer``.

    Args:
        cache: a :class:`FeatureCache` holding ``states.L<layer>``.
        head / head_width / head_dropout: see :func:`~agentrm.models.value_rm.make_value_head`.
    """

    def __init__(self, cache: FeatureCache, layer: int, head: str = "linear", head_width: int | None = None,
                 head_dropout: float = 0.0):
        super().__init__()
        cache.check_provides("states", layer)
        self.cache, self.layer, self.head_type = cache, layer, head
        self.value_head = make_value_head(cache.manifest["hidden_size"], head, head_width, head_dropout)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 step_end_idx: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` cached states of the batch's step ends (zeros at padding), on the head's device."""
        B, S = step_end_idx.shape
        rows = [b for b in range(B) if bool((step_end_idx[b] >= 0).any())]
        entries = self.cache.lookup(input_ids, attention_mask, step_end_idx, rows=rows)
        p = next(self.value_head.parameters())
        feats = torch.zeros((B, S, self.cache.manifest["hidden_size"]), dtype=p.dtype)
        for b, entry in enumerate(entries):
            if entry is not None:
                feats[b, : entry.num_states] = self.cache.states(entry, self.layer).to(p.dtype)
        return feats.to(p.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_end_idx: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` float32 head outputs at the step ends (``0`` at padding), as ``ValueRewardModel.forward``."""
        raw = self.value_head(self.features(input_ids, attention_mask, step_end_idx))[..., 0].float()
        return raw.masked_fill(step_end_idx < 0, 0.0)


class CachedTopLayersRM(nn.Module):
    """Blocks ``layer+1..N`` of the backbone (+ LoRA when given) and a value head, on cached block-``layer`` outputs.

    Args:
        backbone: the backbone of ``N`` blocks (loaded fresh, possibly truncated; turned into its top blocks in
            place by :func:`~agentrm.models.layers.top_layers_model`).
        cache: a :class:`FeatureCache` holding ``tokens.L<layer>``.
        wrap: applied to the top-block model (e.g. a LoRA wrapper); ``None``: every top parameter trains.
    """

    def __init__(self, backbone: nn.Module, cache: FeatureCache, layer: int, head: str = "linear",
                 head_width: int | None = None, head_dropout: float = 0.0, value_activation: str = "none",
                 wrap=None):
        super().__init__()
        cache.check_provides("tokens", layer)
        self.cache, self.layer = cache, layer
        top = top_layers_model(backbone, layer)
        top = wrap(top) if wrap is not None else top
        self.rm = ValueRewardModel(top, value_activation=value_activation, head=head, head_width=head_width,
                                   head_dropout=head_dropout)

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_end_idx: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` cached residual stream after block ``layer`` (zeros at padding), in the blocks' dtype."""
        B, T = input_ids.shape
        entries = self.cache.lookup(input_ids, attention_mask, step_end_idx)
        p = next(self.rm.backbone.parameters())
        h = torch.zeros((B, T, self.cache.manifest["hidden_size"]), dtype=p.dtype)
        for b, entry in enumerate(entries):
            h[b, : entry.num_tokens] = self.cache.tokens(entry, self.layer).to(p.dtype)
        return h.to(p.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_end_idx: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` float32 head outputs at the step ends (``0`` at padding), as ``ValueRewardModel.forward``."""
        h = self.inputs(input_ids, attention_mask, step_end_idx)
        out = self.rm.backbone(inputs_embeds=h, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.rm.step_end_values(hidden, step_end_idx)


def _value_rm_on(backbone: nn.Module, head: nn.Module, head_type: str, manifest: dict, value_activation: str
                 ) -> ValueRewardModel:
    width = getattr(head, "width", None)
    rm = ValueRewardModel(backbone, value_activation=value_activation, head=head_type, head_width=width,
                          causal=manifest["causal"], pooling=manifest["pooling"])
    rm.value_head.load_state_dict({k: v.detach().cpu() for k, v in head.state_dict().items()})
    return rm


def head_rm(manifest: dict, layer: int, head: nn.Module, head_type: str, value_activation: str = "none",
            dtype: str | None = None) -> ValueRewardModel:
    """The :class:`ValueRewardModel` of a cached-feature head: backbone truncated to ``layer`` blocks + ``head``."""
    check_backbone_unchanged(manifest)
    bb = truncate_backbone(build_backbone(manifest["backbone"], dtype=dtype), layer)
    return _value_rm_on(bb, head, head_type, manifest, value_activation)


def merged_top_rm(manifest: dict, model: CachedTopLayersRM, dtype: str | None = None) -> ValueRewardModel:
    """The full :class:`ValueRewardModel` of a top-layer model: a fresh backbone with its blocks above
    ``model.layer`` (and final norm) replaced by the trained ones, any LoRA adapter merged. A model trained on
    fewer blocks than the backbone has (``TopLayersModule(depth=...)``) exports the backbone truncated to
    ``model.layer`` + its blocks."""
    check_backbone_unchanged(manifest)
    top = copy.deepcopy(model.rm.backbone)
    if hasattr(top, "merge_and_unload"):
        top = top.merge_and_unload()
    full = build_backbone(manifest["backbone"], dtype=dtype)
    depth = model.layer + len(blocks(top))
    if depth < num_layers(full):
        truncate_backbone(full, depth)
    for i, block in enumerate(blocks(top)):
        blocks(full)[model.layer + i].load_state_dict(block.state_dict())
    norm_full, norm_top = final_norm(full), final_norm(top)
    if norm_full is not None and norm_top is not None:
        norm_full.load_state_dict(norm_top.state_dict())
    return _value_rm_on(full, model.rm.value_head, model.rm.head_type, manifest, model.rm.value_activation)


def export_value_rm(rm: ValueRewardModel, directory: str | Path, tokenizer, manifest: dict, how: dict,
                    **extra: Any) -> Path:
    """Save ``rm`` with the features it was trained on recorded in ``agentrm_config.json`` (``trained_on``)."""
    trained_on = {"features": how, "backbone": manifest["backbone"],
                  "backbone_fingerprint": manifest.get("backbone_fingerprint"),
                  "num_hidden_layers": manifest.get("num_hidden_layers")}
    return rm.save_pretrained(directory, tokenizer=tokenizer, trained_on=trained_on, **extra)
