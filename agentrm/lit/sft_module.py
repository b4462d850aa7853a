"""Behaviour cloning: supervised fine-tuning of the policy LM on expert trajectories.

The loss is next-token cross-entropy on the assistant *action* tokens only (the tokens
``[step_start_idx, step_end_idx]`` of each step, which include the template's end-of-turn
token so the model learns to stop): instruction and observation tokens are context.
The batch's ``token_step`` (``>= 0`` on action tokens) defines the labels, so any chat
template that :func:`~agentrm.data.tokenize.tokenize_trajectory` accepts works.

The exported directory is a plain Hugging Face causal LM plus tokenizer (LoRA merged),
with ``eos_token_id`` set to the tokenizer's end-of-turn token, so
:class:`~agentrm.policies.hf.HFPolicy` (or ``PolicySpec(kind="hf", model=dir)`` in the
search harness) samples actions from it directly; see :func:`agentrm.policies.hf.load_hf_policy`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from agentrm.lit.optim import adamw_with_warmup_cosine
from agentrm.lit.trainable import apply_lora
from agentrm.models.backbone import build_backbone
from agentrm.paths import check_model_reachable, load_tokenizer

IGNORE = -100


def action_labels(input_ids: torch.Tensor, token_step: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` labels: the token id on assistant action tokens (``token_step >= 0``), ``-100`` elsewhere.

    Unshifted (Hugging Face convention): position ``t`` is predicted from tokens ``< t``.
    """
    return torch.where(token_step >= 0, input_ids, torch.full_like(input_ids, IGNORE))


def shifted_token_stats(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss on the labelled positions after the causal shift.

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` (``-100`` = ignore).

    Returns:
        ``(loss_sum, n_tokens, correct)``: summed cross-entropy, labelled token count and
        a ``[B, T-1]`` bool of argmax hits (False where unlabelled).
    """
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    loss_sum = F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    correct = (pred.argmax(-1) == target) & mask
    return loss_sum, mask.sum(), correct


class PolicySFTModule(L.LightningModule):
    """Causal-LM loss on assistant action tokens (behaviour cloning of an expert).

    Args:
        tokenizer: path or hub id (linked from the DataModule's ``tokenizer`` by the CLI).
        backbone: hub id / local dir of a pretrained causal LM; or
        backbone_config: dict with ``model_type`` and fields for a randomly initialised
            model (the tiny CPU default).
        lora: LoRA fields (``r``, ``lora_alpha``, ``target_modules``...) to train an adapter
            instead of the full model; merged into the weights on :meth:`export`.
        learning_rate, weight_decay, warmup_steps: AdamW with warm-up and cosine decay.

    Validation logs ``val/loss`` (mean per action token), ``val/token_acc`` (teacher-forced
    argmax accuracy per action token) and ``val/step_acc`` (fraction of steps whose every
    action token is the argmax: the greedy policy reproduces the expert's step).
    """

    def __init__(
        self,
        tokenizer: str = "agentrm/assets/tiny_tokenizer",
        backbone: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 30,
        lora: dict[str, Any] | None = None,
        dtype: str | None = None,
        attn_implementation: str = "auto",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if backbone is not None:
            check_model_reachable(backbone, "backbone")  # before anything is fetched
        self.tokenizer = load_tokenizer(tokenizer)
        model = build_backbone(
            backbone,
            backbone_config,
            vocab_size=len(self.tokenizer),
            causal_lm=True,
            dtype=dtype,
            attn_implementation=attn_implementation,
        )
        _set_special_tokens(model, self.tokenizer)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = apply_lora(model, lora, "CAUSAL_LM").train()  # from_pretrained returns eval mode
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_token_acc = MeanMetric()
        self.val_step_acc = MeanMetric()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T, V]`` logits."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def _stats(self, batch: dict[str, torch.Tensor]):
        labels = action_labels(batch["input_ids"], batch["token_step"])
        return shifted_token_stats(self(batch), labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n, _ = self._stats(batch)
        loss = loss_sum / n.clamp(min=1)
        self.train_loss(loss.detach(), weight=max(1, int(n)))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_loss", self.train_loss.compute())
        self.train_loss.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n, correct = self._stats(batch)
        if int(n) == 0:
            return
        self.val_loss.update(loss_sum / n, weight=int(n))
        self.val_token_acc.update(correct.sum() / n, weight=int(n))
        # a step is right when none of its labelled tokens is wrong
        step = batch["token_step"][:, 1:]
        labelled = step >= 0
        S = int(step.max()) + 1
        key = (torch.arange(step.shape[0], device=step.device)[:, None] * S + step)[labelled]
        wrong = torch.zeros(step.shape[0] * S, device=step.device).index_add_(
            0, key, (~correct[labelled]).float()
        )
        present = torch.zeros_like(wrong).index_add_(0, key, torch.ones_like(key, dtype=wrong.dtype)) > 0
        steps_ok = (wrong[present] == 0).float()
        self.val_step_acc.update(steps_ok.mean(), weight=int(steps_ok.numel()))

    def on_validation_epoch_end(self) -> None:
        for name, metric in (
            ("val/loss", self.val_loss),
            ("val/token_acc", self.val_token_acc),
            ("val/step_acc", self.val_step_acc),
        ):
            if metric.update_count:
                self.log(name, metric.compute(), prog_bar=name != "val/token_acc")
            metric.reset()

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup_cosine(
            self.model,
            hp.learning_rate,
            hp.weight_decay,
            hp.warmup_steps,
            int(self.trainer.estimated_stepping_batches),
        )

    def export(self, directory: str | Path, **training: Any) -> Path:
        """Save an HF causal-LM directory (LoRA merged into a copy) with the tokenizer (``training`` is
        not recorded: a policy directory is a plain HF model)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):  # peft: merge a copy, keep training state intact
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(d, safe_serialization=True)
        self.tokenizer.save_pretrained(d)
        return d


def _set_special_tokens(model, tokenizer) -> None:
    """Make ``generate`` stop at the tokenizer's end-of-turn token and pad with its pad token."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        if eos is not None:
            cfg.eos_token_id = eos
        if pad is not None:
            cfg.pad_token_id = pad
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id
