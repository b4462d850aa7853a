"""Implicit process reward model: ``r = beta * log(pi_theta / pi_ref)`` summed over a step's tokens.

Trained on outcome labels only (BCE on ``sigmoid(beta * sum over all steps)``), it
yields per-step process rewards for free.  The reference is frozen: with a LoRA
adapter it is the same base model with the adapter disabled (one model in memory);
otherwise a separate frozen model, loaded from the policy's weights path in its own dtype
(:func:`load_reference`) or, for a model that exists only in memory, copied tensor by tensor
(:func:`frozen_copy`); never a full copy of the policy in the policy's dtype first.  All log-probabilities go through
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
from agentrm.models.backbone import build_backbone, resolve_dtype
from agentrm.models.head_call import causal_lm_head
from agentrm.models.value_rm import AGENTRM_CONFIG, aggregate_steps


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def action_token_rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The hidden-state rows that predict action tokens, with their targets and global step ids.

    Hidden state ``t`` predicts token ``t+1``; it counts towards step ``i`` when token ``t+1`` belongs to
    step ``i``'s action (``token_step[b, t+1] == i``). Only these ``M`` rows go to the kernels: no
    observation, prompt or padding position.

    Returns:
        ``rows [M]`` flat indices into the ``[B*T]`` positions, ``targets [M]`` next-token ids,
        ``step_ids [M]`` (``b*S + i``) and ``num_steps = B*S``.
    """
    ids, token_step = batch["input_ids"], batch["token_step"]
    B, T = ids.shape
    S = batch["step_end_idx"].shape[1]
    nxt_step = token_step[:, 1:]
    b, t = (nxt_step >= 0).nonzero(as_tuple=True)
    return b * T + t, ids[b, t + 1], nxt_step[b, t] + b * S, B * S


def frozen_copy(model: nn.Module, dtype: str | torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` whose floating-point parameters and buffers are in ``dtype`` (``None``: as they are).

    ``copy.deepcopy(model).to(dtype)`` would first duplicate every tensor in the model's own dtype (an fp32
    policy: 4 bytes/param more on every rank before the cast). Here each parameter and buffer is copied
    straight into ``dtype`` (``tensor.to(dtype, copy=True)``: no intermediate in the source dtype) and handed
    to ``deepcopy`` through its memo, which then copies only the module structure; tied weights stay tied.
    The result equals ``copy.deepcopy(model).to(dtype)`` exactly (same casts, buffers included). Used
    where there is no weights path to load from (a model built from a config in memory, e.g. the tests'
    tiny models); see :func:`load_reference` otherwise.
    """
    dtype = resolve_dtype(dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        floating = t.is_floating_point() or t.is_complex()
        return t.detach().to(dtype if (floating and dtype is not None) else t.dtype, copy=True)

    memo: dict[int, Any] = {}
    for p in model.parameters():  # each tied tensor once
        memo[id(p)] = nn.Parameter(cast(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = cast(b)
    return copy.deepcopy(model, memo)


def load_reference(name_or_path: str, dtype: str | torch.dtype | None, attn_implementation: str = "auto",
                   device: str | torch.device | None = None) -> PreTrainedModel:
    """The frozen reference loaded from the policy's weights (``name_or_path``) directly in ``dtype``.

    Each rank reads the checkpoint into ``dtype`` (bf16: 2 bytes/param), never holding an fp32 copy of the
    policy for it; an 8B fp32 policy under FSDP costs 32 GB + 16 GB of host memory per rank before
    sharding instead of 32 GB + 32 GB (``copy.deepcopy`` in fp32, then the cast).
    """
    return build_backbone(name_or_path, causal_lm=True, dtype=dtype, attn_implementation=attn_implementation,
                          device=device)


def cached_reference_logprobs(cache, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``[M]`` reference log-probs at flat hidden rows ``rows`` (row ``b*T + t`` predicts token ``t+1`` of row
    ``b``) read from a features cache (``[t]`` of a cached trajectory: log-prob of its token ``t``).

    Only the rows of ``batch`` that hold action tokens are looked up (by their token ids).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    need = sorted(set((rows // T).tolist()))
    entries = cache.lookup(ids, mask, batch.get("step_end_idx"), rows=need)
    full = torch.zeros((B, T), dtype=torch.float32)
    for b, entry in enumerate(entries):
        if entry is not None:
            full[b, : entry.num_tokens] = cache.ref_logprobs(entry)
    return full.to(rows.device).reshape(-1).index_select(0, rows + 1)


def _take_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[M, H]`` rows of ``[B, T, H]`` hidden states (a view of all positions, one copy of ``M`` rows)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


class ImplicitPRM(nn.Module):
    """Trainable LM ``pi_theta`` and frozen reference ``pi_ref`` scoring steps by their log-ratio.

    Args:
        policy: causal LM (optionally a peft model with a LoRA adapter).
        reference: frozen causal LM (e.g. :func:`load_reference` of the policy's weights path); ``None``
            with a peft ``policy`` means "the policy with its adapter disabled"; ``None`` otherwise copies
            the policy straight into ``reference_dtype`` (:func:`frozen_copy`: no full copy in the policy's
            dtype first).
        beta: reward scale (default 0.05).
        reference_dtype: dtype to keep a separate reference in (e.g. ``"bfloat16"`` while the policy
            trains in fp32: half the memory; ``None`` keeps the policy's dtype).
        reference_cache: a :class:`~agentrm.models.feature_cache.FeatureCache` holding the reference's
            log-probs of every token (``python -m agentrm.precompute --reference_logprobs true``): the
            reference is then read from it, never run (no reference model is loaded or copied); every scored
            trajectory must be in it (a one-line error names the miss).

    The separate reference is a submodule (``reference_model``), so sharding strategies shard it with the
    policy and it travels in Lightning checkpoints; it stays frozen and in eval mode.
    """

    def __init__(self, policy: PreTrainedModel, reference: PreTrainedModel | None = None, beta: float = 0.05,
                 reference_dtype: str | torch.dtype | None = None, reference_cache: Any = None):
        super().__init__()
        self.policy = policy
        self.beta = float(beta)
        self.reference_cache = reference_cache
        if reference is None and not _is_peft(policy) and reference_cache is None:
            reference = frozen_copy(policy, reference_dtype)
        if reference is not None:
            if reference_dtype is not None:
                reference = reference.to(resolve_dtype(reference_dtype))
            reference.requires_grad_(False)
            reference.eval()
            # marks an FSDP unit of its own for agentrm.lit.fsdp.decoder_layer_policy (its dtype may differ)
            reference._agentrm_fsdp_unit = True
        self.reference_model = reference

    @property
    def reference(self) -> PreTrainedModel | None:
        return self.reference_model

    @property
    def config(self):
        return self.policy.config

    def train(self, mode: bool = True) -> ImplicitPRM:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: no dropout, whatever the trainer sets
        return self

    def reference_logprobs(self, batch: dict[str, torch.Tensor], rows: torch.Tensor,
                           targets: torch.Tensor) -> torch.Tensor:
        """``[M]`` reference log-probs of ``targets`` predicted at hidden rows ``rows``, no grad (read from
        ``reference_cache`` when there is one)."""
        if self.reference_cache is not None:
            return cached_reference_logprobs(self.reference_cache, batch, rows)
        with torch.no_grad():
            if self.reference is None:
                ctx, model = self.policy.disable_adapter(), self.policy
            else:
                ctx, model = contextlib.nullcontext(), self.reference
            with ctx:
                return causal_lm_head(
                    model, lambda head, h: token_logprobs(_take_rows(h, rows), head.weight, targets),
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                )

    def step_rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable per-step rewards ``[B, S]`` (``0`` at padding).

        ``r[b, i] = beta * sum_{t in step i} (log pi_theta(y_t) - log pi_ref(y_t))``. The kernels see only
        the action-token rows, and read the LM head inside its forward (see :mod:`.head_call`).
        """
        rows, targets, step_ids, num_steps = action_token_rows(batch)
        ref = self.reference_logprobs(batch, rows, targets)

        def log_ratio(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
            h = _take_rows(hidden, rows)
            return step_logratio(h, head.weight, targets, step_ids, ref, self.beta, num_steps)

        r = causal_lm_head(self.policy, log_ratio, input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"])
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
        if self.reference is None and not _is_peft(self.policy):
            raise ValueError("no reference model to save (trained on cached reference log-probs): load the reference "
                             "into reference_model first, as ImplicitPRMModule.export does")
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
                        device: str | torch.device | None = None, **kwargs: Any) -> ImplicitPRM:
        """Load a directory written by :meth:`save_pretrained` (a LoRA policy loads through peft).

        Args:
            quantization: ``"nf4"``/``"int8"`` bitsandbytes loading of policy and reference
                (CUDA only; fails at once otherwise; ``lm_head`` stays unquantised).
            adapter: a peft adapter directory to put on a full (non-LoRA) policy; the
                saved (separate) reference stays the reference.
            base: override the base recorded for a LoRA policy.
            device: where policy and reference go (quantised ones by ``device_map``); ``None``: CPU.
        """
        d = Path(path)
        cfg_file = d / AGENTRM_CONFIG
        if not cfg_file.exists():
            raise FileNotFoundError(f"{d} is not an agentrm implicit-PRM directory: {AGENTRM_CONFIG} missing")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("model_class") != "ImplicitPRM":
            raise ValueError(f"{cfg_file}: model_class is {cfg.get('model_class')!r}, expected 'ImplicitPRM'")
        load = dict(causal_lm=True, dtype=dtype, attn_implementation=attn_implementation,
                    quantization=quantization, device=device, **kwargs)
        if (d / "policy" / "adapter_config.json").exists():
            base_path = base or resolve_adapter_base(d / "policy", cfg)
            policy = load_adapter(d / "policy", base_path, **load)
        else:
            policy = build_backbone(str(d / "policy"), **load)
        reference = build_backbone(str(d / "reference"), **load) if cfg["reference"] == "separate" else None
        if adapter is not None:
            policy = load_adapter(Path(adapter), policy, causal_lm=True)
        return cls(policy, reference, beta=cfg["beta"])
