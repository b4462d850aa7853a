"""Value RMs on a frozen backbone's cached forward: a head on cached states, or the top blocks (+LoRA) on cached
inputs. Both are :class:`~agentrm.lit.value_module.ValueRMModule`\\ s (same losses, metrics, pairwise loss, label
checks and validation sets) whose model reads the features directory of ``python -m agentrm.precompute``
(:mod:`agentrm.models.feature_rm`) instead of running the frozen layers; both export an ordinary value-RM
directory. They train through ``python -m agentrm.fit`` with the usual data module: its tokenizer and
``max_length`` must be the precompute's (checked), and every batch finds its trajectories in the cache by their
token ids (a trajectory that is not there is a one-line error).

Example config (``model:`` section)::

    model:
      class_path: agentrm.lit.head_module.FeatureHeadModule
      init_args: {features: features/smollm2, layer: 15, head: mlp, head_width: 256, loss: bce}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from agentrm.lit.trainable import apply_lora
from agentrm.lit.value_module import ValueRMModule, check_loss_fits_range
from agentrm.models.backbone import build_backbone
from agentrm.models.feature_cache import FeatureCache, FeatureCacheError, read_manifest, tokenizer_fingerprint
from agentrm.models.feature_rm import (
    CachedFeatureHead,
    CachedTopLayersRM,
    check_backbone_unchanged,
    export_value_rm,
    head_rm,
    merged_top_rm,
)
from agentrm.models.layers import truncate_backbone
from agentrm.paths import resolve_path


def _pick_layer(manifest: dict, layer: int | None, key: str, path: str) -> int:
    have = manifest.get(key, [])
    if layer is None:
        if not have:
            raise FeatureCacheError(f"{path}: holds no {key} (precompute with --{key} [...])")
        return max(have)
    if layer not in have:
        raise FeatureCacheError(f"{path}: holds {key} {have}, not {layer} (precompute with --{key} [{layer}])")
    return layer


class _CachedBase(ValueRMModule):
    """What both cached-forward modules share: the manifest, tokenizer and data checks, the export record."""

    _needs = "states"
    _layers_key = "layers"

    def _open_manifest(self, features: str, layer: int | None) -> int:
        self.features_dir = resolve_path(features)
        self.manifest = read_manifest(self.features_dir)
        return _pick_layer(self.manifest, layer, self._layers_key, features)

    def _check_tokenizer(self) -> None:
        theirs, ours = self.manifest.get("tokenizer_fingerprint"), tokenizer_fingerprint(self.tokenizer)
        if theirs != ours:
            raise FeatureCacheError(
                f"tokenizer {self.hparams.tokenizer!r} (fingerprint {ours}) is not the one the features in "
                f"{self.features_dir} were tokenised with ({self.manifest.get('tokenizer')!r}, {theirs}): set "
                "data.tokenizer to it"
            )

    def setup(self, stage: str) -> None:
        """The data module's ``max_length`` must be the precompute's; the loss must fit its value range."""
        dm = self.trainer.datamodule
        hp = getattr(dm, "hparams", {}) if dm is not None else {}
        if hp.get("max_length") is not None and hp.get("max_length") != self.manifest["max_length"]:
            raise FeatureCacheError(f"data.max_length={hp.get('max_length')} but the features in {self.features_dir} "
                                    f"were tokenised with max_length {self.manifest['max_length']}: use the same")
        if hp.get("value_range") is not None:
            check_loss_fits_range(self.hparams.loss, tuple(hp.get("value_range")))

    def _how(self) -> dict:
        how = {"dir": str(self.features_dir), "layer": self.hparams.layer, "kind": type(self).__name__}
        if self.hparams.get("depth") is not None:
            how["depth"] = self.hparams.depth
        return how


class FeatureHeadModule(_CachedBase):
    """A value head (linear or small MLP) trained on cached step-end states of one layer of a frozen backbone.

    Args:
        features: a features directory written with ``--layers`` (``python -m agentrm.precompute``).
        layer: which cached layer (default: the highest cached).
        tokenizer: linked from ``data.tokenizer`` by ``agentrm.fit``; must be the precompute's (checked).
        head: ``linear`` or ``mlp``; head_width / head_dropout: the MLP's hidden units and training dropout.
        loss, learning_rate, weight_decay, warmup_steps, pairwise_weight: as :class:`ValueRMModule`.

    Exports a :class:`~agentrm.models.value_rm.ValueRewardModel` whose backbone is truncated to ``layer`` blocks
    (:func:`~agentrm.models.feature_rm.head_rm`): it reads exactly the cached states, at ``layer/N`` of the cost.
    """

    def __init__(self, features: str, layer: int | None = None, tokenizer: str | None = None,
                 head: Literal["linear", "mlp"] = "linear", head_width: int = 256, head_dropout: float = 0.1,
                 loss: Literal["mse", "bce"] = "bce", learning_rate: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 20, pairwise_weight: float = 0.0):
        layer = self._open_manifest(features, layer)
        super().__init__(tokenizer=tokenizer or self.manifest["tokenizer"], loss=loss, learning_rate=learning_rate,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, pairwise_weight=pairwise_weight)
        self.save_hyperparameters()  # this class's arguments only: load_from_checkpoint rebuilds this class
        self.hparams.layer, self.hparams.tokenizer = layer, tokenizer or self.manifest["tokenizer"]
        self._check_tokenizer()

    def build_model(self) -> CachedFeatureHead:
        hp = self.hparams
        check_backbone_unchanged(self.manifest)
        return CachedFeatureHead(FeatureCache(self.features_dir, "states", hp.layer), hp.layer, hp.head,
                                 hp.head_width, hp.head_dropout)

    def export(self, directory: str | Path, **training: Any) -> Path:
        """A value-RM directory: the backbone truncated to ``layer`` blocks, the trained head."""
        hp = self.hparams
        rm = head_rm(self.manifest, hp.layer, self.model.value_head, hp.head,
                     "sigmoid" if hp.loss == "bce" else "none")
        return export_value_rm(rm, directory, self.tokenizer, self.manifest, self._how(), loss=hp.loss, **training)


class TopLayersModule(_CachedBase):
    """The blocks above ``layer`` (LoRA, or fully) and a value head, trained on the cached residual stream after
    block ``layer`` at every token; the blocks up to ``layer`` never run.

    Args:
        features: a features directory written with ``--sequence_layers`` (causal LMs only).
        layer: the cached block whose output feeds the trained blocks (default: the highest cached).
        depth: how many blocks the RM keeps (``None``: all of the backbone's). The blocks ``layer+1..depth`` train,
            the blocks above ``depth`` are dropped (as a head's export drops the blocks above its layer): e.g.
            ``layer: 8, depth: 10`` trains two blocks on a SmolLM2 cache of block 8 and scores with 10 of 30 blocks.
        lora: LoRA fields (``r``, ``lora_alpha``, ``target_modules``...) for the top blocks; ``None`` trains
            every parameter of the top blocks and the final norm.
        dtype: dtype the top blocks run in (``None``: the checkpoint's).
        head, head_width, head_dropout, loss, learning_rate, weight_decay, warmup_steps, pairwise_weight:
            as :class:`FeatureHeadModule`.

    Exports the full :class:`~agentrm.models.value_rm.ValueRewardModel`: a fresh backbone (truncated to ``depth``
    blocks) with the trained top blocks (adapter merged) in place (:func:`~agentrm.models.feature_rm.merged_top_rm`).
    """

    _layers_key = "sequence_layers"

    def __init__(self, features: str, layer: int | None = None, tokenizer: str | None = None,
                 depth: int | None = None, lora: dict[str, Any] | None = None, dtype: str | None = None,
                 head: Literal["linear", "mlp"] = "linear", head_width: int = 256, head_dropout: float = 0.1,
                 loss: Literal["mse", "bce"] = "bce", learning_rate: float = 3e-4, weight_decay: float = 0.01,
                 warmup_steps: int = 20, pairwise_weight: float = 0.0):
        layer = self._open_manifest(features, layer)
        super().__init__(tokenizer=tokenizer or self.manifest["tokenizer"], loss=loss, learning_rate=learning_rate,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, pairwise_weight=pairwise_weight)
        self.save_hyperparameters()
        self.hparams.layer, self.hparams.tokenizer = layer, tokenizer or self.manifest["tokenizer"]
        self._check_tokenizer()
        blocks_there = self.manifest.get("num_hidden_layers")
        if depth is not None and not (layer < depth and (blocks_there is None or depth <= blocks_there)):
            raise ValueError(f"depth: {depth} must be above layer {layer} and at most the backbone's "
                             f"{blocks_there} blocks")

    def build_model(self) -> CachedTopLayersRM:
        hp = self.hparams
        check_backbone_unchanged(self.manifest)
        backbone = build_backbone(self.manifest["backbone"], dtype=hp.dtype)
        if hp.depth is not None:
            truncate_backbone(backbone, hp.depth)
        wrap = (lambda top: apply_lora(top, hp.lora, "FEATURE_EXTRACTION")) if hp.lora else None
        return CachedTopLayersRM(backbone, FeatureCache(self.features_dir, "tokens", hp.layer), hp.layer, hp.head,
                                 hp.head_width, hp.head_dropout, "sigmoid" if hp.loss == "bce" else "none", wrap)

    def export(self, directory: str | Path, **training: Any) -> Path:
        """A full value-RM directory with the trained top blocks merged in."""
        rm = merged_top_rm(self.manifest, self.model, dtype=self.hparams.dtype)
        return export_value_rm(rm, directory, self.tokenizer, self.manifest, self._how(), loss=self.hparams.loss,
                               **training)
