"""Explicit value reward model: an LM backbone with a scalar value head read at step ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from agentrm.models.adapters import is_peft_model, load_adapter, resolve_adapter_base, save_adapter_base
from agentrm.models.backbone import build_backbone
from agentrm.models.head_call import call_as_forward
from agentrm.models.step_gather import gather_step_values

AGENTRM_CONFIG = "agentrm_config.json"
VALUE_HEAD_FILE = "value_head.safetensors"
AGGREGATIONS = ("last", "min", "mean", "max")


class ValueRewardModel(nn.Module):
    """Backbone (any HF base model) + ``value_head = Linear(H, 1)`` at each step-end token.

    Args:
        backbone: a Hugging Face model returning ``last_hidden_state`` (``AutoModel``),
            optionally wrapped by peft.
        value_activation: ``"none"`` (trained with MSE) or ``"sigmoid"`` (trained with
            BCE on logits); :meth:`score` applies it, :meth:`forward` does not.
    """

    def __init__(self, backbone: PreTrainedModel, value_activation: str = "none"):
        super().__init__()
        if value_activation not in ("none", "sigmoid"):
            raise ValueError(f"value_activation must be 'none' or 'sigmoid', got {value_activation!r}")
        self.backbone = backbone
        self.value_activation = value_activation
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

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
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return call_as_forward(
            self.value_head,  # read inside the head's forward, so sharded weights are gathered
            lambda head, h: gather_step_values(h, head.weight[0], head.bias[0], step_end_idx),
            hidden,
        )

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
               "hidden_size": self.backbone.config.hidden_size, **extra}
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
        model = cls(backbone, value_activation=cfg.get("value_activation", "none"))
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
