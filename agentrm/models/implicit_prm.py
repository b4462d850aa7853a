"""Implicit process reward model: ``r = beta * log(pi_theta / pi_ref)`` summed over a step's tokens.

Trained on outcome labels only (BCE on ``sigmoid(beta * sum over all steps)``), it
yields per-step process rewards for free.  The reference is frozen: with a LoRA
adapter it is the same base model with the adapter disabled (one model in memory);
otherwise a separate frozen copy.  All log-probabilities go through
:func:`agentrm.kernels.step_logratio`, which never materialises ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from agentrm.kernels import step_logratio, token_logprobs
from agentrm.models.adapters import BASE_SUBDIR, load_adapter, resolve_adapter_base, save_adapter_base
from agentrm.models.backbone import build_backbone
from agentrm.models.value_rm import AGENTRM_CONFIG, aggregate_steps


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` hidden states after the final norm, without computing logits for all tokens."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def step_token_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Next-token targets and global step ids for positions ``0..T-2``.

    Hidden state ``t`` predicts token ``t+1``; it counts towards step ``i`` when token
    ``t+1`` belongs to step ``i``'s action.

    Returns:
        targets ``[B*(T-1)]`` (``-1`` where ignored), step_ids ``[B*(T-1)]`` (``b*S + i`` or
        ``-1``), and ``num_steps = B*S``.
    """
    ids, token_step = batch["input_ids"], batch["token_step"]
    B, S = batch["step_end_idx"].shape
    nxt_step = token_step[:, 1:]
    valid = nxt_step >= 0
    offs = torch.arange(B, device=ids.device)[:, None] * S
    step_ids = torch.where(valid, nxt_step + offs, torch.full_like(nxt_step, -1))
    targets = torch.where(valid, ids[:, 1:], torch.full_like(nxt_step, -1))
    return targets.reshape(-1), step_ids.reshape(-1), B * S


class ImplicitPRM(nn.Module):
    """Trainable LM ``pi_theta`` and frozen reference ``pi_ref`` scoring steps by their log-ratio.

    Args:
        policy: causal LM (optionally a peft model with a LoRA adapter).
        reference: frozen causal LM; ``None`` with a peft ``policy`` means "the policy
            with its adapter disabled"; ``None`` otherwise makes a frozen deep copy.
        beta: reward scale (default 0.05).
    """

    def __init__(self, policy: PreTrainedModel, reference: PreTrainedModel | None = None, beta: float = 0.05):
        super().__init__()
        self.policy = policy
        self.beta = float(beta)
        if reference is None and not _is_peft(policy):
            reference = copy.deepcopy(policy)
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        # kept out of the module tree so it is neither trained nor saved with the policy
        self._reference = [reference]

    @property
    def reference(self) -> PreTrainedModel | None:
        return self._reference[0]

    @property
    def config(self):
        return self.policy.config

    def _lm_weight(self, model: PreTrainedModel) -> torch.Tensor:
        return model.get_output_embeddings().weight

    def reference_logprobs(self, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """``[B*(T-1)]`` reference log-probs of ``targets`` (0 where ignored), no grad."""
        with torch.no_grad():
            if self.reference is None:
                ctx = self.policy.disable_adapter()
                model = self.policy
            else:
                ctx = contextlib.nullcontext()
                model = self.reference
                if next(model.parameters()).device != batch["input_ids"].device:
                    model.to(batch["input_ids"].device)
            with ctx:
                h = final_hidden(model, batch["input_ids"], batch["attention_mask"])
                w = self._lm_weight(model)
                return token_logprobs(h[:, :-1].reshape(-1, h.shape[-1]), w, targets)

    def step_rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable per-step rewards ``[B, S]`` (``0`` at padding).

        ``r[b, i] = beta * sum_{t in step i} (log pi_theta(y_t) - log pi_ref(y_t))``.
        """
        targets, step_ids, num_steps = step_token_targets(batch)
        ref = self.reference_logprobs(batch, targets)
        h = final_hidden(self.policy, batch["input_ids"], batch["attention_mask"])
        r = step_logratio(
            h[:, :-1].reshape(-1, h.shape[-1]), self._lm_weight(self.policy), targets, step_ids, ref,
            self.beta, num_steps,
        )
        return r.view(batch["step_end_idx"].shape)

    def outcome_logits(self, step_rewards: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` outcome logit: the sum of a trajectory's step rewards."""
        return (step_rewards * step_mask).sum(1)

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-step process rewards ``[B, S]`` (``nan`` at padded steps)."""
        r = self.step_rewards(batch)
        return r.masked_fill(~batch["step_mask"], float("nan"))

    @torch.no_grad()
    def score_trajectory(self, batch: dict[str, torch.Tensor], aggregate: str = "min") -> torch.Tensor:
        """``[B]`` trajectory score from step rewards: ``min`` (default), ``mean``, ``last`` or ``sum``."""
        return aggregate_steps(self.score(batch), aggregate)

    # ---- persistence ---------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, tokenizer=None, **extra: Any) -> Path:
        """Save the policy (full model or LoRA adapter), and the reference when it is a separate model."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(d / "policy", safe_serialization=True)
        ref_kind = "adapter_disabled" if self.reference is None else "separate"
        if self.reference is not None:
            self.reference.save_pretrained(d / "reference", safe_serialization=True)
        cfg = {"model_class": "ImplicitPRM", "beta": self.beta, "reference": ref_kind, **extra}
        if _is_peft(self.policy):
            base = save_adapter_base(self.policy, d)
            cfg.update(adapter=True, base_model=base if base != BASE_SUBDIR else f"../{BASE_SUBDIR}")
        (d / AGENTRM_CONFIG).write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        return d

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None,
                        attn_implementation: str = "auto", quantization: str | None = None,
                        adapter: str | Path | None = None, base: str | None = None,
                        **kwargs: Any) -> ImplicitPRM:
        """Load a directory written by :meth:`save_pretrained` (a LoRA policy loads through peft).

        Args:
            quantization: ``"nf4"``/``"int8"`` bitsandbytes loading of policy and reference
                (CUDA only; fails at once otherwise; ``lm_head`` stays unquantised).
            adapter: a peft adapter directory to put on a full (non-LoRA) policy; the
                saved (separate) reference stays the reference.
            base: override the base recorded for a LoRA policy.
        """
        d = Path(path)
        cfg_file = d / AGENTRM_CONFIG
        if not cfg_file.exists():
            raise FileNotFoundError(f"{d} is not an agentrm implicit-PRM directory: {AGENTRM_CONFIG} missing")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("model_class") != "ImplicitPRM":
            raise ValueError(f"{cfg_file}: model_class is {cfg.get('model_class')!r}, expected 'ImplicitPRM'")
        load = dict(causal_lm=True, dtype=dtype, attn_implementation=attn_implementation,
                    quantization=quantization, **kwargs)
        if (d / "policy" / "adapter_config.json").exists():
            base_path = base or resolve_adapter_base(d / "policy", cfg)
            policy = load_adapter(d / "policy", base_path, **load)
        else:
            policy = build_backbone(str(d / "policy"), **load)
        reference = build_backbone(str(d / "reference"), **load) if cfg["reference"] == "separate" else None
        if adapter is not None:
            policy = load_adapter(Path(adapter), policy, causal_lm=True)
        return cls(policy, reference, beta=cfg["beta"])
