"""peft adapter helpers shared by the value RM and the implicit PRM: record, resolve and load a LoRA base."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from agentrm.models.backbone import build_backbone

BASE_SUBDIR = "base"


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (has adapters that can be disabled)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def save_adapter_base(model: nn.Module, directory: Path) -> str:
    """Return the base to record for ``model``'s adapter; save the base under ``base/`` if it has no name.

    A base loaded from a hub id or a directory is recorded by that name.  A base built
    from a config (random weights, the tiny CPU setup) has no name, so a copy of it
    without the adapter is written to ``directory/base`` and recorded as ``"base"``.
    """
    cfg = model.peft_config[getattr(model, "active_adapter", "default")]
    name = cfg.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", "")
    if name:
        return str(name)
    base = copy.deepcopy(model).unload()
    base.save_pretrained(directory / BASE_SUBDIR, safe_serialization=True)
    return BASE_SUBDIR


def resolve_adapter_base(directory: Path, cfg: dict[str, Any]) -> str:
    """The base model of an adapter-only directory: ``agentrm_config.json``'s ``base_model``, else peft's."""
    base = cfg.get("base_model")
    if not base:
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(str(directory)).base_model_name_or_path
    if not base:
        raise ValueError(f"{directory}: adapter without a recorded base model; pass base=...")
    local = directory / base
    return str(local) if local.exists() else str(base)


def load_adapter(adapter_dir: Path, base: str | PreTrainedModel, causal_lm: bool, **load: Any) -> nn.Module:
    """Put the peft adapter in ``adapter_dir`` on ``base`` (a loaded model, or a name/path to load with ``load``)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory: adapter_config.json missing")
    if is_peft_model(base):
        raise ValueError(
            f"cannot stack adapter {adapter_dir} on a model that already has one; merge it first "
            "(agentrm.models.export.merge_adapter)"
        )
    model = base if isinstance(base, nn.Module) else build_backbone(base, causal_lm=causal_lm, **load)
    return PeftModel.from_pretrained(model, str(adapter_dir))
