"""Build the trainable backbone of a LightningModule: load/build, k-bit preparation, checkpointing, LoRA."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedModel

from agentrm.models.backbone import build_backbone
from agentrm.models.quant import check_quantization, validate_training_setup


def linear_module_names(model) -> list[str]:
    """Leaf names of the ``nn.Linear`` layers inside the decoder (``lm_head`` excluded), sorted.

    LLaMA/SmolLM2 and Gemma 3 both give ``down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj``.
    """
    from torch import nn

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and not n.endswith("lm_head")})


def apply_lora(model, lora: dict[str, Any] | None, task_type: str):
    """Wrap ``model`` with a peft LoRA adapter built from ``lora`` (LoraConfig fields).

    ``target_modules`` given as a list of names must all exist in the model (a name that
    matches nothing is an error naming the model's linear layers, not a silently smaller adapter);
    peft's ``"all-linear"`` is passed through.
    """
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = dict(lora)
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        have = linear_module_names(model)
        missing = [t for t in targets if t not in have]
        if missing:
            raise ValueError(f"lora.target_modules {missing} match no linear layer of "
                             f"{type(model).__name__}; its linear layers are {have}")
    cfg.setdefault("task_type", task_type)
    return get_peft_model(model, LoraConfig(**cfg))


def build_trainable_backbone(
    backbone: str | None,
    backbone_config: dict[str, Any] | None,
    *,
    vocab_size: int,
    causal_lm: bool,
    lora: dict[str, Any] | None,
    dtype: str | None = None,
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    quantization: str | None = None,
) -> PreTrainedModel:
    """The backbone a reward-model module trains.

    Checks the quantisation/LoRA combination before anything loads, loads or builds the
    model (:func:`~agentrm.models.backbone.build_backbone`), prepares a quantised base for
    QLoRA (``prepare_model_for_kbit_training``) or enables gradient checkpointing, then
    wraps it with LoRA when ``lora`` is given (task type from ``causal_lm``).
    """
    validate_training_setup(quantization, lora)
    check_quantization(quantization)
    model = build_backbone(
        backbone, backbone_config, vocab_size=vocab_size, causal_lm=causal_lm,
        dtype=dtype, attn_implementation=attn_implementation, quantization=quantization,
    )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return apply_lora(model, lora, "CAUSAL_LM" if causal_lm else "FEATURE_EXTRACTION")


class ModelBuiltInConfigure:
    """Mixin for LightningModules whose ``self.model`` is built in ``configure_model``, not ``__init__``.

    The Trainer calls ``configure_model`` inside the strategy's init context: on the rank's own device
    for DDP (no host copy per rank), under ``deepspeed.zero.Init`` for ZeRO-3 (partitioned as it is
    built), before FSDP wraps the model. ``load_from_checkpoint`` calls it too, so checkpoints and resumes
    work unchanged. Used outside a Trainer (scripts, tests), ``self.model`` is built on first access.
    Subclasses implement :meth:`build_model`.
    """

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def configure_model(self) -> None:
        if "model" not in self._modules:
            # ``from_pretrained`` returns a model in eval mode and Lightning keeps each submodule's mode:
            # without this a pretrained backbone would train with its dropout off (frozen parts that must
            # stay in eval mode, like the implicit PRM's reference, keep it through their own ``train``).
            self.model = self.build_model().train(self.training)

    def __getattr__(self, name: str) -> Any:
        if name == "model" and "model" not in self.__dict__.get("_modules", {}):
            self.configure_model()
            return self._modules["model"]
        return super().__getattr__(name)
