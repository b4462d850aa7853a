"""Merge a LoRA adapter into its base for export: ``python -m agentrm.models.export --merge IN OUT``.

Works on agentrm value-RM and implicit-PRM directories (their heads and configs are kept)
and on plain peft adapter directories.  The merged directory loads without peft.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agentrm.models.adapters import load_adapter, resolve_adapter_base
from agentrm.models.backbone import build_backbone
from agentrm.models.value_rm import AGENTRM_CONFIG


def merge_adapter(path_in: str | Path, path_out: str | Path, dtype: str | None = None) -> Path:
    """Write ``path_out``: the model of ``path_in`` with its LoRA adapter merged into the base weights.

    For an implicit PRM whose reference was "the base with the adapter disabled", the
    merged directory stores that base as a separate ``reference``.
    """
    d_in, d_out = Path(path_in), Path(path_out)
    cfg_file = d_in / AGENTRM_CONFIG
    kind = json.loads(cfg_file.read_text()).get("model_class") if cfg_file.exists() else None
    if kind == "ValueRewardModel":
        from agentrm.models.value_rm import ValueRewardModel

        model = ValueRewardModel.from_pretrained(d_in, dtype=dtype)
        if not hasattr(model.backbone, "merge_and_unload"):
            raise ValueError(f"{d_in} has no LoRA adapter to merge")
        model.backbone = model.backbone.merge_and_unload()
        cfg = json.loads(cfg_file.read_text())
        extra = {
            k: v
            for k, v in cfg.items()
            if k not in ("model_class", "value_activation", "hidden_size", "adapter", "base_model")
        }
        return model.save_pretrained(d_out, **extra)
    if kind == "ImplicitPRM":
        from agentrm.models.implicit_prm import ImplicitPRM

        cfg = json.loads(cfg_file.read_text())
        prm = ImplicitPRM.from_pretrained(d_in, dtype=dtype)
        if not hasattr(prm.policy, "merge_and_unload"):
            raise ValueError(f"{d_in} has no LoRA adapter to merge")
        reference = prm.reference
        if reference is None:
            base = resolve_adapter_base(d_in / "policy", cfg)
            reference = build_backbone(base, causal_lm=True, dtype=dtype)
        merged = ImplicitPRM(prm.policy.merge_and_unload(), reference, beta=prm.beta)
        extra = {
            k: v
            for k, v in cfg.items()
            if k not in ("model_class", "beta", "reference", "adapter", "base_model")
        }
        return merged.save_pretrained(d_out, **extra)
    if (d_in / "adapter_config.json").exists():
        from peft import PeftConfig

        pc = PeftConfig.from_pretrained(str(d_in))
        causal = str(pc.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
        model = load_adapter(d_in, resolve_adapter_base(d_in, {}), causal_lm=causal, dtype=dtype)
        model.merge_and_unload().save_pretrained(d_out, safe_serialization=True)
        return d_out
    raise ValueError(f"{d_in}: neither an agentrm model directory nor a peft adapter directory")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m agentrm.models.export", description=__doc__)
    parser.add_argument(
        "--merge",
        nargs=2,
        metavar=("IN", "OUT"),
        required=True,
        help="adapter directory (agentrm or peft) and the output directory",
    )
    parser.add_argument("--dtype", default=None, help="load/save dtype, e.g. bfloat16")
    args = parser.parse_args(argv)
    out = merge_adapter(*args.merge, dtype=args.dtype)
    print(f"merged model written to {out}")
    return out


if __name__ == "__main__":
    main()
