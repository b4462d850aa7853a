"""Models are built in ``configure_model`` (not ``__init__``); the PRM's reference travels in checkpoints."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from agentrm.fit import main
from agentrm.lit.fsdp import decoder_layer_policy
from agentrm.lit.prm_module import ImplicitPRMModule
from agentrm.lit.sft_module import PolicySFTModule
from agentrm.lit.value_module import ValueRMModule
from agentrm.paths import load_tokenizer
from tests.lit.conftest import TINY_BACKBONE


@pytest.mark.parametrize("cls", [ValueRMModule, ImplicitPRMModule])
def test_init_builds_nothing_and_configure_model_builds_once(cls):
    module = cls(backbone_config=TINY_BACKBONE)
    assert "model" not in module._modules and sum(1 for _ in module.parameters()) == 0
    module.configure_model()
    built = module._modules["model"]
    module.configure_model()  # the Trainer and load_from_checkpoint may both call it
    assert module.model is built and sum(p.numel() for p in module.parameters()) > 0


def test_outside_a_trainer_the_model_is_built_on_first_access():
    module = ValueRMModule(backbone_config=TINY_BACKBONE)
    assert module.model is module._modules["model"]
    with pytest.raises(AttributeError):
        module.no_such_attribute  # noqa: B018


def test_early_errors_still_come_from_init():
    with pytest.raises(ValueError, match="LoRA|lora"):
        ImplicitPRMModule(backbone="meta-llama/Meta-Llama-3-8B-Instruct", quantization="int8")


def _prm(seed: int) -> ImplicitPRMModule:
    torch.manual_seed(seed)
    module = ImplicitPRMModule(backbone_config=TINY_BACKBONE, reference_dtype="bfloat16")
    module.configure_model()
    return module


def test_reference_round_trips_through_the_state_dict():
    a, b = _prm(0), _prm(1)
    state = a.state_dict()
    assert any(k.startswith("model.reference_model.") for k in state)
    assert next(a.model.reference.parameters()).dtype == torch.bfloat16
    b.on_load_checkpoint({"state_dict": state})
    b.load_state_dict(state)
    for (name, p), q in zip(a.model.reference.named_parameters(), b.model.reference.parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_of_the_old_format_loads():
    """Before the reference was a submodule, a random-init reference was saved as reference_state_dict."""
    a, b = _prm(0), _prm(1)
    state = {k: v for k, v in a.state_dict().items() if not k.startswith("model.reference_model.")}
    checkpoint = {"state_dict": state, "reference_state_dict": a.model.reference.state_dict()}
    b.on_load_checkpoint(checkpoint)
    b.load_state_dict(checkpoint["state_dict"])  # strict: every key present
    assert all(torch.equal(p, q) for p, q in zip(a.model.reference.parameters(), b.model.reference.parameters()))


def test_fsdp_policy_makes_the_reference_its_own_unit():
    module = _prm(0)
    assert decoder_layer_policy(module.model.reference, recurse=False)
    assert not decoder_layer_policy(module.model.policy, recurse=False)
    assert decoder_layer_policy(module.model.policy.model.layers[0], recurse=False)


class RecordTrainModes(L.Callback):
    """Records, at every training batch, the names of the LightningModule's submodules in eval mode."""

    seen: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        RecordTrainModes.seen.append([name for name, m in pl_module.named_modules() if not m.training])


@pytest.mark.parametrize("class_path", ["agentrm.lit.value_module.ValueRMModule",
                                        "agentrm.lit.prm_module.ImplicitPRMModule"])
def test_a_pretrained_backbone_trains_in_train_mode(tiny_setup, tmp_path, class_path):
    """``from_pretrained`` returns eval mode and Lightning keeps submodule modes: through ``agentrm.fit`` the
    backbone (here with attention dropout) must train in train mode, only the PRM's frozen reference in eval."""
    cfg_path, _ = tiny_setup
    cfg = yaml.safe_load(cfg_path.read_text())
    vocab = len(load_tokenizer(cfg["data"]["tokenizer"]))
    fields = {k: v for k, v in TINY_BACKBONE.items() if k != "model_type"}
    pretrained = tmp_path / "pretrained"
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, attention_dropout=0.2, **fields)).save_pretrained(pretrained)
    cfg["model"] = {"class_path": class_path, "init_args": {"backbone": str(pretrained), "warmup_steps": 2}}
    cfg["trainer"]["max_epochs"] = 1
    cfg["trainer"]["callbacks"].append({"class_path": "tests.lit.test_configure_model.RecordTrainModes"})
    cfg_path.write_text(yaml.safe_dump(cfg))
    RecordTrainModes.seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["--config", str(cfg_path)])
    assert not [w for w in caught if "in eval mode" in str(w.message)]  # nor the reference's, which is on purpose
    assert RecordTrainModes.seen, "no training batch ran"
    for in_eval in RecordTrainModes.seen:
        assert all(name.startswith("model.reference_model") for name in in_eval), in_eval[:5]
    if class_path.endswith("ImplicitPRMModule"):
        assert all("model.reference_model" in in_eval for in_eval in RecordTrainModes.seen)


def test_sft_policy_from_pretrained_is_in_train_mode(tmp_path):
    fields = {k: v for k, v in TINY_BACKBONE.items() if k != "model_type"}
    vocab = len(load_tokenizer("agentrm/assets/tiny_tokenizer"))
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, attention_dropout=0.2, **fields)).save_pretrained(tmp_path)
    module = PolicySFTModule(backbone=str(tmp_path))
    assert all(m.training for m in module.modules())
