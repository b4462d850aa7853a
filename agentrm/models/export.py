"""Exports of agentrm models for other tools: ``python -m agentrm.models.export``.

* ``--merge IN OUT``: a LoRA adapter merged into its base. Works on agentrm value-RM and implicit-PRM
  directories (their heads and configs are kept) and on plain peft adapter directories; the merged
  directory loads without peft.
* ``--format token-classification IN OUT``: a value RM as a standard Hugging Face
  ``*ForTokenClassification`` checkpoint (``num_labels=1``, the backbone as its base model, the value head as
  its ``score`` layer; a LoRA adapter is merged first), loadable by ``AutoModelForTokenClassification`` and
  servable by vLLM's pooling runner (``docs/serving.md``). Its per-token output at a step-end token is the
  RM's raw head output there; an RM trained with BCE (``value_activation: sigmoid``, recorded in the
  checkpoint's ``agentrm_export.json``) gives its value as ``sigmoid`` of that output.
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


TOKEN_CLASSIFICATION_NOTE = "agentrm_export.json"


def export_token_classification(path_in: str | Path, path_out: str | Path, dtype: str | None = None) -> Path:
    """Write the value RM at ``path_in`` as a ``*ForTokenClassification`` checkpoint at ``path_out`` (module doc).

    Raises:
        ValueError: ``path_in`` is not a value RM, ``path_out`` is not empty, or the backbone's architecture has
            no token-classification class with a ``score`` layer in transformers.
    """
    import torch
    from transformers import AutoModelForTokenClassification

    from agentrm.models.value_rm import ValueRewardModel

    d_in, d_out = Path(path_in), Path(path_out)
    cfg_file = d_in / AGENTRM_CONFIG
    kind = json.loads(cfg_file.read_text()).get("model_class") if cfg_file.exists() else None
    if kind != "ValueRewardModel":
        raise ValueError(f"{d_in}: a token-classification export needs an agentrm value RM (found {kind!r})")
    if d_out.exists() and any(d_out.iterdir()):
        raise ValueError(f"{d_out}: exists and is not empty (nothing is overwritten)")
    rm = ValueRewardModel.from_pretrained(d_in, dtype=dtype)
    if rm.head_type != "linear" or not rm.causal:
        why = f"an {rm.head_type} value head" if rm.head_type != "linear" else "a non-causal (encoder) backbone"
        raise ValueError(f"{d_in}: has {why}; a token-classification checkpoint holds one linear 'score' layer read "
                         "on a causal forward")
    backbone = rm.backbone.merge_and_unload() if hasattr(rm.backbone, "merge_and_unload") else rm.backbone
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.num_labels = 1
    config.id2label, config.label2id = {0: "value"}, {"value": 0}
    try:
        model = AutoModelForTokenClassification.from_config(config)
    except ValueError as e:
        raise ValueError(f"{d_in}: transformers has no token-classification model for {config.model_type!r}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    score = getattr(model, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.out_features != 1:
        raise ValueError(f"{type(model).__name__} has no one-label 'score' layer to hold the value head")
    getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())
    with torch.no_grad():
        score.weight.copy_(rm.value_head.weight)
        score.bias.copy_(rm.value_head.bias)
    model.to(next(backbone.parameters()).dtype).eval()
    model.save_pretrained(d_out, safe_serialization=True)
    from agentrm.paths import load_tokenizer

    try:
        load_tokenizer(str(d_in)).save_pretrained(d_out)
    except (OSError, ValueError):
        pass  # an RM exported without its tokenizer: the user supplies the training tokenizer
    note = {"exported_from": str(d_in), "value_activation": rm.value_activation,
            "read_at": "the token closing each step's observation turn (the step-end token of the chat template)",
            "value": "sigmoid(output)" if rm.value_activation == "sigmoid" else "output"}
    (d_out / TOKEN_CLASSIFICATION_NOTE).write_text(json.dumps(note, indent=2))
    return d_out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m agentrm.models.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--merge",
        nargs=2,
        metavar=("IN", "OUT"),
        help="adapter directory (agentrm or peft) and the output directory",
    )
    parser.add_argument("--format", choices=("token-classification",), default=None,
                        help="token-classification: a value RM as a *ForTokenClassification checkpoint (IN OUT)")
    parser.add_argument("paths", nargs="*", metavar="IN OUT", help="with --format: the RM directory and the output")
    parser.add_argument("--dtype", default=None, help="load/save dtype, e.g. bfloat16")
    args = parser.parse_args(argv)
    if args.merge and args.format:
        parser.error("give --merge IN OUT or --format token-classification IN OUT, not both")
    if args.merge:
        out = merge_adapter(*args.merge, dtype=args.dtype)
        print(f"merged model written to {out}")
        return out
    if not args.format or len(args.paths) != 2:
        parser.error("give --merge IN OUT or --format token-classification IN OUT")
    try:
        out = export_token_classification(*args.paths, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(f"token-classification checkpoint written to {out} (value = {json.loads((out / TOKEN_CLASSIFICATION_NOTE).read_text())['value']} "
          "at each step-end token)")
    return out


if __name__ == "__main__":
    main()
