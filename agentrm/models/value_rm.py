"""Explicit value reward model: an LM backbone with a scalar value head read at step ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from agentrm.kernels import step_values
from agentrm.models.adapters import is_peft_model, load_adapter, resolve_adapter_base, save_adapter_base
from agentrm.models.backbone import build_backbone
from agentrm.models.head_call import call_as_forward
from agentrm.models.step_gather import flat_step_index, gather_step_values

AGENTRM_CONFIG = "agentrm_config.json"
VALUE_HEAD_FILE = "value_head.safetensors"
AGGREGATIONS = ("last", "min", "mean", "max")
HEAD_TYPES = ("linear", "mlp")
POOLINGS = ("last", "mean")
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2",
                                 "mpnet", "albert", "modernbert"})
"""Bidirectional encoders: a token sees every token of its sequence (see ``causal`` in :class:`ValueRewardModel`)."""


def is_causal_backbone(config) -> bool:
    """Whether a backbone's tokens see only earlier tokens (decoder LMs) rather than the whole sequence."""
    return getattr(config, "model_type", None) not in ENCODER_MODEL_TYPES


class ValueMLPHead(nn.Module):
    """``Linear(H, width) -> GELU -> Dropout -> Linear(width, 1)``: a small non-linear value head.

    Args:
        hidden: backbone width ``H``. width: hidden units. dropout: training-time dropout (not saved).
    """

    def __init__(self, hidden: int, width: int, dropout: float = 0.0):
        super().__init__()
        self.width = width
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., 1]``."""
        return self.net(h)


def make_value_head(hidden: int, head: str = "linear", width: int | None = None, dropout: float = 0.0) -> nn.Module:
    """The value head: ``Linear(H, 1)`` (default init as the RM always had) or :class:`ValueMLPHead`."""
    if head == "linear":
        lin = nn.Linear(hidden, 1)
        nn.init.normal_(lin.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(lin.bias)
        return lin
    if head == "mlp":
        if not width or width < 1:
            raise ValueError(f"an mlp value head needs width >= 1, got {width!r}")
        return ValueMLPHead(hidden, int(width), dropout)
    raise ValueError(f"head must be one of {HEAD_TYPES}, got {head!r}")


def pool_rows(hidden: torch.Tensor, mask: torch.Tensor, end: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row: the state at ``end`` (``last``) or the mean over the row's real tokens up to ``end``.

    Args:
        hidden: ``[R, T, H]``; mask: ``[R, T]`` (1 = real token); end: ``[R]`` position of each row's state.
    Returns:
        ``[R, H]``.
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        return hidden[rows, end]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    keep = (mask.bool() & (torch.arange(hidden.shape[1], device=hidden.device)[None, :] <= end[:, None])).to(hidden.dtype)
    return (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)


class ValueRewardModel(nn.Module):
    """Backbone (any HF base model) + ``value_head = Linear(H, 1)`` at each step-end token.

    Args:
        backbone: a Hugging Face model returning ``last_hidden_state`` (``AutoModel``),
            optionally wrapped by peft.
        value_activation: ``"none"`` (trained with MSE) or ``"sigmoid"`` (trained with
            BCE on logits); :meth:`score` applies it, :meth:`forward` does not.
        head: ``"linear"`` (``Linear(H, 1)``, read through the fused step-values kernel) or ``"mlp"``
            (:class:`ValueMLPHead` of ``head_width`` units, applied to the gathered step-end states).
        causal: whether the backbone's tokens see only earlier tokens (``None``: decided from the model type,
            :func:`is_causal_backbone`). A **non-causal** backbone (a bidirectional encoder such as
            all-MiniLM-L6-v2) would let a step-end token see the later steps, and the outcome, of a
            whole-trajectory forward; with ``causal=False`` every step is therefore encoded from its own
            prefix (tokens ``0..step_end``) in a row of its own, so no value depends on anything after its
            step (scorers take the plain path: one row per candidate, see :class:`~agentrm.scoring.ValueRMScorer`).
        pooling: ``"last"`` (the state at the step-end token) or, for a non-causal backbone only, ``"mean"``
            (the mean of the prefix's token states: how sentence encoders are trained to be read).
    """

    prefix_rows_per_forward = 64
    """Non-causal backbones: step prefixes encoded per backbone call (bounds activation memory)."""

    def __init__(self, backbone: PreTrainedModel, value_activation: str = "none", head: str = "linear",
                 head_width: int | None = None, causal: bool | None = None, pooling: str = "last",
                 head_dropout: float = 0.0):
        super().__init__()
        if value_activation not in ("none", "sigmoid"):
            raise ValueError(f"value_activation must be 'none' or 'sigmoid', got {value_activation!r}")
        self.backbone = backbone
        self.value_activation = value_activation
        self.causal = is_causal_backbone(backbone.config) if causal is None else bool(causal)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "mean" and self.causal:
            raise ValueError("pooling='mean' is for non-causal backbones (each state is its own prefix row); "
                             "a causal backbone reads the step-end token ('last')")
        self.pooling = pooling
        self.head_type = head
        self.value_head = make_value_head(backbone.config.hidden_size, head, head_width, head_dropout)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_end_idx: torch.Tensor
    ) -> torch.Tensor:
        """Raw head outputs at step ends.

        Args:
            input_ids, attention_mask: ``[B, T]``.
            step_end_idx: ``[B, S]`` token index of each step end, ``-1`` for padding.
        Returns:
            ``[B, S]`` float32 head outputs (``0`` at padding).
        """
        if not self.causal:
            return self._forward_prefixes(input_ids, attention_mask, step_end_idx)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.step_end_values(hidden, step_end_idx)

    def step_end_values(self, hidden: torch.Tensor, step_end_idx: torch.Tensor) -> torch.Tensor:
        """The head at the step ends of final hidden states ``[B, T, H]`` -> ``[B, S]`` float32 (``0`` at padding)."""
        if self.head_type != "linear":
            B, T, H = hidden.shape
            flat, valid = flat_step_index(step_end_idx, T)
            vals = self.head_values(hidden.reshape(B * T, H), flat)
            return torch.zeros(step_end_idx.shape, dtype=torch.float32, device=hidden.device).masked_scatter(valid, vals)
        return call_as_forward(
            self.value_head,  # read inside the head's forward, so sharded weights are gathered
            lambda head, h: gather_step_values(h, head.weight[0], head.bias[0], step_end_idx),
            hidden,
        )

    def _forward_prefixes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          step_end_idx: torch.Tensor) -> torch.Tensor:
        """Non-causal backbone: step ``(b, i)`` is encoded from ``input_ids[b, :step_end_idx[b, i] + 1]`` alone.

        Returns ``[B, S]`` float32 head outputs (``0`` at padding), as :meth:`forward`.
        """
        b_idx, s_idx = (step_end_idx >= 0).nonzero(as_tuple=True)
        out = torch.zeros(step_end_idx.shape, dtype=torch.float32, device=input_ids.device)
        if b_idx.numel() == 0:
            return out + 0.0 * sum(p.sum() for p in self.value_head.parameters())  # keep the head in the graph
        ends = step_end_idx[b_idx, s_idx]
        vals = []
        for r0 in range(0, b_idx.numel(), self.prefix_rows_per_forward):
            rb, re_ = b_idx[r0 : r0 + self.prefix_rows_per_forward], ends[r0 : r0 + self.prefix_rows_per_forward]
            width = int(re_.max()) + 1
            pos = torch.arange(width, device=input_ids.device)[None, :]
            mask = attention_mask[rb, :width] * (pos <= re_[:, None]).to(attention_mask.dtype)
            ids = input_ids[rb, :width]
            hidden = self.backbone(input_ids=ids, attention_mask=mask)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            vals.append(self.rows_values(hidden, mask, re_))
        return out.index_put((b_idx, s_idx), torch.cat(vals))

    def head_values(self, hidden: torch.Tensor, idx: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
        """Head outputs ``[K]`` (float32) at rows ``idx [K]`` of flat hidden states ``[N, H]`` (``sigmoid``: applied).

        The linear head goes through the fused step-values kernel, read inside the head's forward (sharded
        weights are gathered); an MLP head runs on the ``K`` gathered rows.
        """
        if self.head_type == "linear":
            return call_as_forward(
                self.value_head, lambda head, h: step_values(h, head.weight[0], head.bias[0], idx, sigmoid=sigmoid),
                hidden,
            )
        rows = hidden.index_select(0, idx).to(next(self.value_head.parameters()).dtype)
        vals = self.value_head(rows)[:, 0].float()
        return torch.sigmoid(vals) if sigmoid else vals

    def rows_values(self, hidden: torch.Tensor, mask: torch.Tensor, end: torch.Tensor, sigmoid: bool = False
                    ) -> torch.Tensor:
        """Head outputs ``[R]`` of rows that each hold one state: :func:`pool_rows` (``pooling``) then the head.

        Args:
            hidden: ``[R, T, H]``; mask: ``[R, T]``; end: ``[R]`` position of each row's state.
        """
        pooled = pool_rows(hidden, mask, end, self.pooling)
        return self.head_values(pooled, torch.arange(pooled.shape[0], device=pooled.device), sigmoid)

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-step values ``[B, S]`` (activation applied; ``nan`` at padded steps)."""
        raw = self(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
        vals = torch.sigmoid(raw) if self.value_activation == "sigmoid" else raw
        return vals.masked_fill(batch["step_end_idx"] < 0, float("nan"))

    @torch.no_grad()
    def score_trajectory(self, batch: dict[str, torch.Tensor], aggregate: str = "last") -> torch.Tensor:
        """One score per trajectory ``[B]``: the ``last`` (default), ``min``, ``mean`` or ``max`` step value.

        A trajectory with no step scores ``nan``.
        """
        return aggregate_steps(self.score(batch), aggregate)

    # ---- Hugging Face style persistence -------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, tokenizer=None, **extra: Any) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (or a peft adapter), the value head and our config.

        With a LoRA backbone only the adapter is written, and ``agentrm_config.json``
        records the base (``base_model``); a base without a name (built from a config)
        is saved alongside under ``base/`` so the directory reloads on its own.
        """
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(d, safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(d / VALUE_HEAD_FILE))
        cfg = {"model_class": "ValueRewardModel", "value_activation": self.value_activation,
               "hidden_size": self.backbone.config.hidden_size, "causal": self.causal, "pooling": self.pooling,
               "head": {"type": self.head_type, **({"width": self.value_head.width} if self.head_type == "mlp" else {})},
               **extra}
        if is_peft_model(self.backbone):
            cfg.update(adapter=True, base_model=save_adapter_base(self.backbone, d))
        (d / AGENTRM_CONFIG).write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        return d

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None,
                        attn_implementation: str = "auto", quantization: str | None = None,
                        adapter: str | Path | None = None, base: str | None = None,
                        device: str | torch.device | None = None, **kwargs: Any) -> ValueRewardModel:
        """Load a directory written by :meth:`save_pretrained`.

        Args:
            quantization: ``"nf4"``/``"int8"`` to load the backbone weights through
                bitsandbytes, on a CUDA GPU or the CPU (another device fails at once).
            adapter: a peft adapter directory to put on top of the loaded backbone; if it
                holds a ``value_head.safetensors`` (an agentrm LoRA directory) that head is used.
            base: override the base model recorded for an adapter-only directory.
            device: where the model goes (a quantised backbone is placed there by ``device_map``);
                ``None`` leaves it on the CPU.  The value head follows the backbone.
        """
        d = Path(path)
        cfg_file = d / AGENTRM_CONFIG
        if not cfg_file.exists():
            raise FileNotFoundError(f"{d} is not an agentrm value-RM directory: {AGENTRM_CONFIG} missing")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("model_class") != "ValueRewardModel":
            raise ValueError(f"{cfg_file}: model_class is {cfg.get('model_class')!r}, expected 'ValueRewardModel'")
        load = dict(dtype=dtype, attn_implementation=attn_implementation, quantization=quantization,
                    device=device, **kwargs)
        if (d / "adapter_config.json").exists():
            backbone = load_adapter(d, base or resolve_adapter_base(d, cfg), causal_lm=False, **load)
        else:
            backbone = build_backbone(str(d), **load)
        head_file = d / VALUE_HEAD_FILE
        if adapter is not None:
            backbone = load_adapter(Path(adapter), backbone, causal_lm=False)
            if (Path(adapter) / VALUE_HEAD_FILE).exists():
                head_file = Path(adapter) / VALUE_HEAD_FILE
        head = cfg.get("head") or {"type": "linear"}
        model = cls(backbone, value_activation=cfg.get("value_activation", "none"), head=head.get("type", "linear"),
                    head_width=head.get("width"), causal=cfg.get("causal"), pooling=cfg.get("pooling", "last"))
        model.value_head.load_state_dict(load_file(str(head_file)))
        model.value_head.to(next(backbone.parameters()).device)
        return model


def aggregate_steps(step_scores: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Reduce ``[B, S]`` step scores (``nan`` = padding) to ``[B]``.

    ``last`` takes the last real step; ``min``/``max``/``mean``/``sum`` ignore padding.
    Rows without any step give ``nan`` (``0`` for ``sum``).
    """
    valid = ~torch.isnan(step_scores)
    if aggregate == "last":
        n = valid.sum(1)
        idx = (n - 1).clamp(min=0)
        out = step_scores.gather(1, idx[:, None])[:, 0]
        return out.masked_fill(n == 0, float("nan"))
    if aggregate == "sum":
        return torch.where(valid, step_scores, torch.zeros_like(step_scores)).sum(1)
    if aggregate == "mean":
        return torch.where(valid, step_scores, torch.zeros_like(step_scores)).sum(1) / valid.sum(1)
    if aggregate == "min":
        out = torch.where(valid, step_scores, torch.full_like(step_scores, float("inf"))).amin(1)
    elif aggregate == "max":
        out = torch.where(valid, step_scores, torch.full_like(step_scores, float("-inf"))).amax(1)
    else:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS + ('sum',)}, got {aggregate!r}")
    return out.masked_fill(valid.sum(1) == 0, float("nan"))
