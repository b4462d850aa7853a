"""LightningModule training the implicit PRM on outcome labels."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from agentrm.lit.dist_metrics import synced_compute
from agentrm.lit.metrics import AUROCOrNaN
from agentrm.lit.optim import adamw_with_warmup_cosine
from agentrm.lit.trainable import ModelBuiltInConfigure, build_trainable_backbone
from agentrm.models.feature_cache import FeatureCache, FeatureCacheError, read_manifest
from agentrm.models.implicit_prm import ImplicitPRM, load_reference
from agentrm.models.quant import check_quantization, validate_training_setup
from agentrm.models.value_rm import aggregate_steps
from agentrm.paths import check_model_reachable, load_tokenizer, resolve_path


class ImplicitPRMModule(ModelBuiltInConfigure, L.LightningModule):
    """Outcome loss on the implicit reward ``r = beta * sum_t log(pi_theta/pi_ref)`` of a whole trajectory.

    ``loss="bce"`` (default): BCE-with-logits of ``r`` against the success label (Yuan et al.'s
    implicit PRM).  ``loss="mse"``: ``(r - reward)^2`` against the trajectory's reward, the
    outcome or progress in ``[0, 1]`` (the AgentRM paper trains its implicit RM with MSE).  With
    ``beta`` the reward's scale is fixed: a step's reward is ``beta`` times the log-ratio sum of its
    action tokens, so a larger ``beta`` lets the policy move less from the reference to reach a target.

    Args:
        tokenizer: path or hub id (linked from the DataModule by the CLI).
        backbone / backbone_config: pretrained causal LM, or a config to build one.
        beta: reward scale (default 0.05).
        loss: ``bce`` (against success) or ``mse`` (against the reward).
        lora: LoRA fields; with LoRA the reference is the base with the adapter disabled.
        aggregate: step-reward aggregation for the trajectory score in validation.
        quantization: ``"nf4"``/``"int8"`` bitsandbytes base for QLoRA (needs CUDA,
            bitsandbytes, ``lora`` and a non-sharding strategy; checked before loading).
        reference_dtype: dtype of the separate frozen reference (full training only), e.g.
            ``"bfloat16"``: half the memory of an fp32 copy; ``None`` keeps the policy's dtype.
            With a ``backbone`` the reference is loaded from it in that dtype
            (:func:`~agentrm.models.implicit_prm.load_reference`: no fp32 copy of the policy on any rank);
            with a ``backbone_config`` (random init, nothing on disk) it is copied from the policy tensor by
            tensor into that dtype (:func:`~agentrm.models.implicit_prm.frozen_copy`).
        reference_logprobs: a features directory written by ``python -m agentrm.precompute --backbone <the same
            backbone> --reference_logprobs true`` over every file this run reads (training and validation): the
            reference log-probs are read from it, once computed, instead of a reference forward every step, and
            no reference model is loaded while training (with LoRA, the adapter-disabled forward is skipped
            too). Its backbone, tokenizer and ``max_length`` must be this run's (checked); the export loads the
            reference then, so the exported directory scores on its own.

    The models are built in ``configure_model`` (see :class:`~agentrm.lit.trainable.ModelBuiltInConfigure`).
    """

    trains_on = "outcomes"
    """What the data module checks the labels of (:mod:`agentrm.data.labels`): trajectory outcomes."""

    def __init__(
        self,
        tokenizer: str = "agentrm/assets/tiny_tokenizer",
        backbone: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        beta: float = 0.05,
        loss: Literal["bce", "mse"] = "bce",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 30,
        lora: dict[str, Any] | None = None,
        aggregate: str = "min",
        dtype: str | None = None,
        attn_implementation: str = "auto",
        gradient_checkpointing: bool = False,
        quantization: str | None = None,
        reference_dtype: str | None = None,
        reference_logprobs: str | None = None,
    ):
        super().__init__()
        if loss not in ("bce", "mse"):
            raise ValueError(f"loss must be 'bce' or 'mse', got {loss!r}")
        self.save_hyperparameters()
        validate_training_setup(quantization, lora)  # early errors, before anything loads
        check_quantization(quantization)
        if backbone is not None:
            check_model_reachable(backbone, "backbone")
        self.tokenizer = load_tokenizer(tokenizer)
        if reference_logprobs is not None:
            self._reference_manifest = reference_features_manifest(reference_logprobs, backbone, self.tokenizer)
        self.val_auroc = AUROCOrNaN("val/auroc")
        self.val_step_auroc = AUROCOrNaN("val/step_auroc")
        self.val_loss = MeanMetric()

    def build_model(self) -> ImplicitPRM:
        hp = self.hparams
        policy = build_trainable_backbone(
            hp.backbone, hp.backbone_config, vocab_size=len(self.tokenizer), causal_lm=True, lora=hp.lora,
            dtype=hp.dtype, attn_implementation=hp.attn_implementation,
            gradient_checkpointing=hp.gradient_checkpointing, quantization=hp.quantization,
        )
        reference, cache = None, None
        if hp.get("reference_logprobs"):  # read once-computed log-probs: no reference model while training
            cache = FeatureCache(resolve_path(hp.reference_logprobs), "ref_logprobs")
        elif not hp.lora and hp.backbone:  # the same weights, read again in the reference's own dtype
            dtype = hp.get("reference_dtype") or next(policy.parameters()).dtype
            reference = load_reference(hp.backbone, dtype, hp.attn_implementation)
        return ImplicitPRM(policy, reference, beta=hp.beta, reference_dtype=hp.get("reference_dtype"),
                           reference_cache=cache)

    def setup(self, stage: str) -> None:
        """Reject quantisation under a sharding strategy before the strategy wraps the model, and cached reference
        log-probs tokenised with another ``max_length`` than the data module's."""
        validate_training_setup(self.hparams.quantization, self.hparams.lora, self.trainer.strategy)
        dm = self.trainer.datamodule
        max_length = (getattr(dm, "hparams", None) or {}).get("max_length") if dm is not None else None
        manifest = getattr(self, "_reference_manifest", None)
        if manifest is not None and max_length is not None and max_length != manifest["max_length"]:
            raise FeatureCacheError(f"data.max_length={max_length} but the reference log-probs in "
                                    f"{self.hparams.reference_logprobs} were tokenised with max_length "
                                    f"{manifest['max_length']}: use the same")

    def on_fit_start(self) -> None:
        """The frozen reference is in eval mode on purpose: silence Lightning's "Found N module(s) in eval mode"
        warning when those N modules are exactly the reference's (any other module in eval mode still warns)."""
        in_eval = [name for name, m in self.named_modules() if not m.training]
        if in_eval and all(name.startswith("model.reference_model") for name in in_eval):
            warnings.filterwarnings("ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold the reference (a submodule) under ``model.reference_model.``; fill it in for
        checkpoints written before that (a ``reference_state_dict`` entry, or none for a pretrained one)."""
        if self.model.reference is None:
            return
        prefix, state = "model.reference_model.", checkpoint["state_dict"]
        old = checkpoint.pop("reference_state_dict", None)
        if not any(k.startswith(prefix) for k in state):
            src = old if old is not None else self.model.reference.state_dict()
            state.update({prefix + k: v for k, v in src.items()})

    def _outcome_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.model.step_rewards(batch)
        total = self.model.outcome_logits(r, batch["step_mask"])  # [B] beta * sum over all action tokens
        if self.hparams.get("loss", "bce") == "mse":
            return F.mse_loss(total, batch["reward"].to(total.dtype)), r
        return F.binary_cross_entropy_with_logits(total, batch["success"]), r

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._outcome_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, r = self._outcome_loss(batch)
        self.val_loss.update(loss, weight=batch["input_ids"].shape[0])
        mask = batch["step_mask"]
        scores = aggregate_steps(r.masked_fill(~mask, float("nan")), self.hparams.aggregate)
        has = ~torch.isnan(scores)
        # update on every batch (empty selections included): same state dtypes on every DDP rank
        self.val_auroc.update(scores[has], batch["success"][has].long())
        success = batch["success"][:, None].expand_as(mask)
        self.val_step_auroc.update(r[mask], success[mask].long())

    def on_validation_epoch_end(self) -> None:
        # collective on every rank under DDP (see agentrm.lit.dist_metrics)
        for name, metric in (("val/loss", self.val_loss), ("val/auroc", self.val_auroc),
                             ("val/step_auroc", self.val_step_auroc)):
            value = synced_compute(metric)
            if value is not None:
                self.log(name, value, prog_bar=name in ("val/loss", "val/auroc"))

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup_cosine(
            self.model.policy, hp.learning_rate, hp.weight_decay, hp.warmup_steps,
            int(self.trainer.estimated_stepping_batches),
        )

    def export(self, directory: str | Path, **training: Any) -> Path:
        """Save as a directory ``ImplicitPRM.from_pretrained`` loads (``training``: as the value RM's export).

        Trained on cached reference log-probs without LoRA, the reference (the backbone, frozen) is loaded now
        and saved with the policy, so the directory scores new trajectories on its own."""
        model, hp = self.model, self.hparams
        if model.reference is None and model.reference_cache is not None and not hp.lora:
            dtype = hp.get("reference_dtype") or next(model.policy.parameters()).dtype
            model.reference_model = load_reference(hp.backbone, dtype, hp.attn_implementation).requires_grad_(False)
            try:
                return model.save_pretrained(directory, tokenizer=self.tokenizer, aggregate=hp.aggregate,
                                             loss=hp.loss, **training)
            finally:
                model.reference_model = None
        return model.save_pretrained(directory, tokenizer=self.tokenizer, aggregate=hp.aggregate,
                                     loss=hp.loss, **training)


def reference_features_manifest(path: str, backbone: str | None, tokenizer) -> dict[str, Any]:
    """The manifest of a reference log-prob cache, checked against the run: written with ``--reference_logprobs
    true`` by the same backbone (name and unchanged weights) and tokenizer.

    Raises:
        FeatureCacheError: one line naming what differs.
    """
    from agentrm.models.feature_cache import tokenizer_fingerprint
    from agentrm.models.feature_rm import check_backbone_unchanged

    manifest = read_manifest(resolve_path(path))
    if not manifest.get("reference_logprobs"):
        raise FeatureCacheError(f"reference_logprobs: {path} holds no reference log-probs (precompute with "
                                "--reference_logprobs true)")
    if backbone is None or manifest["backbone"] != backbone:
        raise FeatureCacheError(f"reference_logprobs: {path} was computed with backbone {manifest['backbone']!r}, "
                                f"this run trains {backbone!r}: the reference must be the policy's starting point")
    check_backbone_unchanged(manifest)
    if manifest.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise FeatureCacheError(f"reference_logprobs: {path} was tokenised with {manifest.get('tokenizer')!r}, "
                                "not this run's tokenizer")
    return manifest
