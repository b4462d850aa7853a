"""LightningModule training the explicit value reward model on step-value targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MeanSquaredError

from agentrm.data.labels import LabelError
from agentrm.data.schema import format_range
from agentrm.lit.dist_metrics import synced_compute
from agentrm.lit.metrics import AUROCOrNaN, PairwiseRankingAccuracy, PerTypeAUROC
from agentrm.lit.optim import adamw_with_warmup_cosine
from agentrm.lit.trainable import ModelBuiltInConfigure, build_trainable_backbone
from agentrm.models.quant import check_quantization, validate_training_setup
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import check_model_reachable, load_tokenizer


class ValueRMModule(ModelBuiltInConfigure, L.LightningModule):
    """Regress step-end values onto Monte-Carlo / tree-search value targets.

    Args:
        tokenizer: path or hub id (linked from the DataModule's ``tokenizer`` by the CLI).
        backbone: hub id or local dir of a pretrained model; or
        backbone_config: dict with ``model_type`` and fields to build a randomly
            initialised model (the tiny CPU default).
        loss: ``mse`` on raw head outputs, or ``bce`` on logits with soft labels.
        lora: LoRA fields (``r``, ``lora_alpha``, ``target_modules``...) to train an
            adapter instead of the full backbone.
        quantization: ``"nf4"``/``"int8"``: load the pretrained backbone through
            bitsandbytes and train a LoRA adapter on it (QLoRA) on a CUDA GPU or the CPU; needs
            ``lora`` and a non-sharding strategy, all checked before anything is loaded.
        pairwise_weight: weight of an extra Bradley-Terry loss on sibling pairs in the batch
            (steps with the same ``step_parent``, different ``step_action`` and different
            targets, e.g. MCTS siblings): ``-log sigmoid(pred_better - pred_worse)``.

    The model is built in ``configure_model`` (see :class:`~agentrm.lit.trainable.ModelBuiltInConfigure`).
    It trains on step values (``trains_on``): the data module refuses data without enough of them, or
    with one value only (:mod:`agentrm.data.labels`), and :meth:`setup` refuses a loss that does not fit
    the declared ``data.value_range`` (BCE needs ``[0, 1]``; MSE takes any range).

    Validation: one :class:`StepValueMetrics` per validation set. The data module's ``val_set_names``
    (default ``["val"]``) names the set of each validation dataloader, e.g. ``["val", "val_unseen"]`` with
    ``data.val_unseen_path``: ``val/*`` and ``val_unseen/*`` metrics are logged side by side.
    """

    trains_on = "step_values"

    def __init__(
        self,
        tokenizer: str = "agentrm/assets/tiny_tokenizer",
        backbone: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        loss: Literal["mse", "bce"] = "mse",
        learning_rate: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        lora: dict[str, Any] | None = None,
        dtype: str | None = None,
        attn_implementation: str = "auto",
        gradient_checkpointing: bool = False,
        quantization: str | None = None,
        pairwise_weight: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        validate_training_setup(quantization, lora)  # early errors, before anything loads
        check_quantization(quantization)
        if backbone is not None:
            check_model_reachable(backbone, "backbone")
        self.tokenizer = load_tokenizer(tokenizer)
        self.val_sets = nn.ModuleDict({name: StepValueMetrics(name) for name in VALIDATION_SETS})
        self.train_loss = MeanMetric()

    def build_model(self) -> ValueRewardModel:
        hp = self.hparams
        bb = build_trainable_backbone(
            hp.backbone, hp.backbone_config, vocab_size=len(self.tokenizer), causal_lm=False, lora=hp.lora,
            dtype=hp.dtype, attn_implementation=hp.attn_implementation,
            gradient_checkpointing=hp.gradient_checkpointing, quantization=hp.quantization,
        )
        return ValueRewardModel(bb, value_activation="sigmoid" if hp.loss == "bce" else "none")

    def setup(self, stage: str) -> None:
        """Reject quantisation under a sharding strategy before the strategy wraps the model, and a loss
        that does not fit the data module's declared value range (runs after the data module's setup)."""
        validate_training_setup(self.hparams.quantization, self.hparams.lora, self.trainer.strategy)
        dm = self.trainer.datamodule
        value_range = dm.hparams.get("value_range") if dm is not None and hasattr(dm, "hparams") else None
        if value_range is not None:
            check_loss_fits_range(self.hparams.loss, tuple(value_range))

    def on_fit_start(self) -> None:
        """Refuse to train when no training step has a value target (the loss would be 0 and mean nothing)."""
        dm = self.trainer.datamodule
        batching = dm.hparams.get("batching") if dm is not None and hasattr(dm, "hparams") else None
        if self.hparams.get("pairwise_weight", 0.0) and batching != "groups":
            rank_zero_warn(
                "pairwise_weight > 0 with data.batching=shuffle: sibling steps rarely share a micro-batch, so the "
                "pairwise loss seldom fires; set --data.batching groups"
            )
        items = getattr(dm, "train_items", None) if dm else None
        if items and not any(v == v for it in items for v in it.step_values):  # a data module without label checks
            raise LabelError(
                f"none of the {len(items)} training trajectories has a step value target ('value' on a step); "
                "collect them with python -m agentrm.collect (Monte-Carlo values) or python -m agentrm.trees"
            )

    def _loss(self, raw: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labeled = batch["step_mask"] & ~torch.isnan(batch["step_values"])
        target = batch["step_values"][labeled]
        pred = raw[labeled]
        if pred.numel() == 0:
            # keep every parameter in the graph so DDP ranks without labels do not hang
            return raw.sum() * 0.0, labeled
        if self.hparams.loss == "bce":  # targets in [0, 1]: checked against data.value_range at setup
            return F.binary_cross_entropy_with_logits(pred, target), labeled
        return F.mse_loss(pred, target), labeled

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        raw = self.model(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
        loss, labeled = self._loss(raw, batch)
        if self.hparams.get("pairwise_weight", 0.0):
            pair_loss = sibling_pair_loss(raw, batch, labeled)
            self.log("train/pair_loss", pair_loss, batch_size=batch["input_ids"].shape[0])
            n_pairs = float(sibling_pairs(batch, labeled).sum())
            self.log("train/sibling_pairs", n_pairs, reduce_fx="sum", on_step=False, on_epoch=True)
            loss = loss + self.hparams.pairwise_weight * pair_loss
        self.train_loss(loss.detach(), weight=max(1, int(labeled.sum())))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_loss", self.train_loss.compute(), sync_dist=False)
        self.train_loss.reset()

    def _val_set_names(self) -> list[str]:
        """The validation set of each dataloader (the data module's ``val_set_names``; default ``["val"]``)."""
        trainer = self._trainer
        dm = trainer.datamodule if trainer is not None else None
        names = list(getattr(dm, "val_set_names", None) or ["val"])
        unknown = [n for n in names if n not in self.val_sets]
        if unknown:
            raise ValueError(f"validation sets {unknown} are not among the value RM's {list(self.val_sets)}")
        return names

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        raw = self.model(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
        pred = torch.sigmoid(raw) if self.hparams.loss == "bce" else raw
        self.val_sets[self._val_set_names()[dataloader_idx]].update(pred, batch)

    def on_validation_epoch_end(self) -> None:
        for name in self._val_set_names():  # the same sets, in the same order, on every DDP rank
            for key, value in self.val_sets[name].compute_and_reset().items():
                self.log(key, value, prog_bar=key in ("val/mse", "val/auroc", "val_unseen/auroc"))

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup_cosine(
            self.model, hp.learning_rate, hp.weight_decay, hp.warmup_steps, int(self.trainer.estimated_stepping_batches)
        )

    def export(self, directory: str | Path, **training: Any) -> Path:
        """Save the trained model as a Hugging Face directory ``ValueRewardModel.from_pretrained`` loads.

        ``training`` (e.g. ``max_length``, the data module's context budget) is recorded in
        ``agentrm_config.json`` with the loss, so scorers default to what the RM was trained with.
        """
        return self.model.save_pretrained(directory, tokenizer=self.tokenizer, loss=self.hparams.loss, **training)


VALIDATION_SETS = ("val", "val_unseen")
"""Validation sets the value RM reports (metric prefixes): held-in, and task types absent from training."""


class StepValueMetrics(nn.Module):
    """The value RM's validation metrics over one validation set, logged as ``<prefix>/<metric>``.

    ``mse`` (predicted vs target step values), ``auroc`` (every step's value against its trajectory's success),
    ``type_auroc`` (the same within each task type, averaged over the types that hold successes and failures,
    :class:`~agentrm.lit.metrics.PerTypeAUROC`; ``type_auroc_types``: how many), ``traj_auroc`` (the last step's
    value against success), ``rank_acc`` and ``rank_pairs`` (ordering of sibling steps by value,
    :class:`~agentrm.lit.metrics.PairwiseRankingAccuracy`).
    """

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.mse = MeanSquaredError()
        self.auroc = AUROCOrNaN(f"{prefix}/auroc")
        self.traj_auroc = AUROCOrNaN(f"{prefix}/traj_auroc")
        self.type_auroc = PerTypeAUROC(f"{prefix}/type_auroc")
        self.rank_acc = PairwiseRankingAccuracy()

    def update(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Add a batch: ``pred`` ``[B, S]`` predicted values at the step ends; ``batch`` as collated (``step_mask``,
        ``step_values``, ``step_parent``, ``step_action``: ``[B, S]``; ``success``, ``task_key``: ``[B]``)."""
        mask = batch["step_mask"]
        labeled = mask & ~torch.isnan(batch["step_values"])
        # Update on every batch, with empty selections when there is nothing to add, so
        # that every DDP rank holds states of the same dtypes for the epoch-end gather.
        self.mse.update(pred[labeled], batch["step_values"][labeled])
        success = batch["success"][:, None].expand_as(mask)
        self.auroc.update(pred[mask], success[mask].long())
        self.type_auroc.update(pred[mask], success[mask], batch["task_key"][:, None].expand_as(mask)[mask])
        has_step = mask.any(1)
        last = mask.sum(1).clamp(min=1) - 1
        last_pred = pred.gather(1, last[:, None])[:, 0]
        self.traj_auroc.update(last_pred[has_step], batch["success"][has_step].long())
        self.rank_acc.update(
            pred[labeled], batch["step_values"][labeled], batch["step_parent"][labeled], batch["step_action"][labeled]
        )

    def compute_and_reset(self) -> dict[str, torch.Tensor | float]:
        """``{"<prefix>/mse": ..., ...}`` (a metric without data is left out), then reset every state.

        Every call below is collective under DDP and made on every rank (see :mod:`agentrm.lit.dist_metrics`).
        """
        out: dict[str, torch.Tensor | float] = {}
        for name, metric in (("mse", self.mse), ("auroc", self.auroc), ("traj_auroc", self.traj_auroc),
                             ("type_auroc", self.type_auroc)):
            value = synced_compute(metric)
            if value is not None:
                out[f"{self.prefix}/{name}"] = value
        if f"{self.prefix}/type_auroc" in out:
            out[f"{self.prefix}/type_auroc_types"] = float(self.type_auroc.groups_averaged)
        with self.rank_acc.sync_context():
            pairs, correct = self.rank_acc.pair_count_and_correct()
        if pairs:
            out[f"{self.prefix}/rank_acc"] = correct / pairs
            out[f"{self.prefix}/rank_pairs"] = float(pairs)
        self.rank_acc.reset()
        return out


def check_loss_fits_range(loss: str, value_range: tuple[float, float]) -> None:
    """BCE reads targets as probabilities: the declared value range must lie in ``[0, 1]``; MSE takes any.

    Raises:
        LabelError: one line naming ``model.init_args.loss``, ``data.value_range`` and the ways out.
    """
    lo, hi = value_range
    if loss == "bce" and not (0.0 <= lo and hi <= 1.0):
        raise LabelError(
            f"model.init_args.loss=bce needs value targets in [0, 1], but data.value_range is "
            f"{format_range(value_range)}: pass --model.init_args.loss mse (any range), or rescale the values "
            f"to [0, 1] and declare --data.value_range [0, 1]"
        )


def sibling_pairs(batch: dict[str, torch.Tensor], labeled: torch.Tensor, margin: float = 1e-6) -> torch.Tensor:
    """``[M, M]`` bool over the ``M`` labeled steps: ``[i, j]`` when i and j are siblings and i's target is higher."""
    target = batch["step_values"][labeled]
    parent, action = batch["step_parent"][labeled], batch["step_action"][labeled]
    pairs = (parent[:, None] == parent[None, :]) & (action[:, None] != action[None, :])
    return pairs & (target[:, None] > target[None, :] + margin)


def sibling_pair_loss(raw: torch.Tensor, batch: dict[str, torch.Tensor], labeled: torch.Tensor,
                      margin: float = 1e-6) -> torch.Tensor:
    """Bradley-Terry loss over sibling pairs of the batch (0, in the graph, when there are none).

    Siblings share ``step_parent`` (identical prefix) and differ in ``step_action``; for each
    pair whose targets differ by more than ``margin``, the loss is ``softplus(-(r_better - r_worse))``
    on the raw head outputs.
    """
    pred = raw[labeled]
    pairs = sibling_pairs(batch, labeled, margin)
    if not bool(pairs.any()):
        return raw.sum() * 0.0
    return F.softplus(-(pred[:, None] - pred[None, :])[pairs]).mean()
