"""LoRA save/load round trips, adapter merging, and unsupported quantisation setups failing early with clear messages.

Quantised loading and QLoRA that run on the CPU are in ``tests/models/test_quant_cpu.py``.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from agentrm.models import quant
from agentrm.models.export import main as export_main
from agentrm.models.export import merge_adapter
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.quant import QuantizationUnavailable, UnsupportedTrainingSetup, validate_training_setup
from agentrm.models.value_rm import AGENTRM_CONFIG, ValueRewardModel

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def tiny_config():
    return AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
    )


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 12), generator=g)
    token_step = torch.full((2, 12), -1)
    token_step[:, 3:6], token_step[:, 8:11] = 0, 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "step_end_idx": torch.tensor([[5, 10]] * 2),
        "step_mask": torch.ones(2, 2, dtype=torch.bool),
        "token_step": token_step,
    }


@pytest.fixture()
def base_dirs(tmp_path):
    """A tiny randomly initialised base saved as if it were a pretrained checkpoint."""
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config()).save_pretrained(tmp_path / "base")
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(tmp_path / "base_lm")
    return tmp_path


def lora_value_rm(base: str) -> ValueRewardModel:
    from agentrm.lit.trainable import apply_lora
    from agentrm.models.backbone import build_backbone

    torch.manual_seed(1)
    model = ValueRewardModel(apply_lora(build_backbone(base), LORA, "FEATURE_EXTRACTION"))
    torch.nn.init.normal_(model.value_head.weight)
    return model.eval()


def test_value_rm_lora_round_trip_and_merge(base_dirs):
    tmp = base_dirs
    model = lora_value_rm(str(tmp / "base"))
    ref = model.score(batch())
    out = model.save_pretrained(tmp / "rm", loss="mse")
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    cfg = json.loads((out / AGENTRM_CONFIG).read_text())
    assert cfg["adapter"] is True and cfg["base_model"] == str(tmp / "base")
    loaded = ValueRewardModel.from_pretrained(out).eval()
    torch.testing.assert_close(loaded.score(batch()), ref)
    # the adapter matters: the bare base scores differently
    with loaded.backbone.disable_adapter():
        assert not torch.allclose(loaded.score(batch()), ref)
    # the adapter on top of a full base: base dir + adapter=PATH (value head from the adapter dir)
    ValueRewardModel(AutoModel.from_pretrained(tmp / "base")).save_pretrained(tmp / "full_base")
    on_top = ValueRewardModel.from_pretrained(tmp / "full_base", adapter=out).eval()
    torch.testing.assert_close(on_top.score(batch()), ref)
    # merge for export: no peft needed to load, same scores
    merged = export_main(["--merge", str(out), str(tmp / "merged")])
    assert not (merged / "adapter_config.json").exists()
    m = ValueRewardModel.from_pretrained(merged).eval()
    assert not hasattr(m.backbone, "peft_config")
    torch.testing.assert_close(m.score(batch()), ref, rtol=1e-4, atol=1e-5)


def test_value_rm_lora_on_config_built_base_saves_the_base(tmp_path):
    from agentrm.lit.trainable import apply_lora

    torch.manual_seed(0)
    model = ValueRewardModel(
        apply_lora(AutoModel.from_config(tiny_config()), LORA, "FEATURE_EXTRACTION")
    ).eval()
    out = model.save_pretrained(tmp_path / "rm")
    assert json.loads((out / AGENTRM_CONFIG).read_text())["base_model"] == "base"
    torch.testing.assert_close(
        ValueRewardModel.from_pretrained(out).eval().score(batch()), model.score(batch())
    )


def test_implicit_prm_lora_round_trip_adapter_and_merge(base_dirs):
    from peft import LoraConfig, get_peft_model

    tmp = base_dirs
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(tmp / "base_lm")
    prm = ImplicitPRM(get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA)), beta=0.5).eval()
    ref = prm.score(batch())
    assert ref.abs().sum() > 0
    prm.save_pretrained(tmp / "prm")
    assert json.loads((tmp / "prm" / AGENTRM_CONFIG).read_text())["base_model"] == str(tmp / "base_lm")
    torch.testing.assert_close(ImplicitPRM.from_pretrained(tmp / "prm").eval().score(batch()), ref)
    # adapter=PATH on a full policy: the saved separate reference stays the reference
    prm.policy.save_pretrained(tmp / "adapter_only")
    full = ImplicitPRM(AutoModelForCausalLM.from_pretrained(tmp / "base_lm"), beta=0.5)
    full.save_pretrained(tmp / "full_prm")
    on_top = ImplicitPRM.from_pretrained(tmp / "full_prm", adapter=tmp / "adapter_only").eval()
    torch.testing.assert_close(on_top.score(batch()), ref)
    merged = ImplicitPRM.from_pretrained(merge_adapter(tmp / "prm", tmp / "prm_merged")).eval()
    assert merged.reference is not None
    torch.testing.assert_close(merged.score(batch()), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantization_on_a_device_without_a_backend_fails_at_once(scheme, tmp_path):
    """CUDA and the CPU run nf4/int8 (tests/models/test_quant_cpu.py); any other device is refused before loading."""
    from agentrm.models.backbone import build_backbone

    with mock.patch("transformers.AutoModel.from_pretrained") as load:
        with pytest.raises(QuantizationUnavailable, match="runs on a CUDA GPU or the CPU"):
            build_backbone("meta-llama/Meta-Llama-3-8B-Instruct", quantization=scheme, device="mps")
        with pytest.raises(QuantizationUnavailable, match="device='mps'"):
            ValueRewardModel.from_pretrained(_fake_rm_dir(tmp_path), quantization=scheme, device="mps")
        load.assert_not_called()


def _fake_rm_dir(tmp_path):
    (tmp_path / AGENTRM_CONFIG).write_text(json.dumps({"model_class": "ValueRewardModel"}))
    return tmp_path


def test_quantization_without_bitsandbytes_names_the_install_line():
    with mock.patch.object(quant.importlib.util, "find_spec", return_value=None):
        for device in ("cpu", "cuda:0"):
            with pytest.raises(QuantizationUnavailable, match=r"pip install -c constraints.txt 'bitsandbytes>=0\.48"):
                quant.check_quantization("nf4", device)
    with pytest.raises(ValueError, match="quantization must be one of"):
        quant.check_quantization("fp3")


def test_bnb_config_keeps_heads_unquantised():
    cfg = quant.bnb_config("nf4")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert {"lm_head", "value_head"} <= set(cfg.llm_int8_skip_modules)
    assert quant.bnb_config("int8").load_in_8bit


def test_unsupported_training_setups_fail_early():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(UnsupportedTrainingSetup, match="without a LoRA adapter"):
        validate_training_setup("nf4", None)
    with pytest.raises(UnsupportedTrainingSetup, match="FSDP"):
        validate_training_setup("nf4", LORA, FSDPStrategy())
    with pytest.raises(UnsupportedTrainingSetup, match="cannot be sharded"):
        validate_training_setup("int8", LORA, "deepspeed_stage_3")
    validate_training_setup("nf4", LORA, DDPStrategy())
    validate_training_setup("nf4", LORA, "auto")
    validate_training_setup(None, None, FSDPStrategy())


def test_module_rejects_quantization_before_loading():
    """The LightningModule checks the setup before touching the (8B) checkpoint."""
    from agentrm.lit.value_module import ValueRMModule

    with mock.patch("agentrm.lit.trainable.build_backbone") as build:
        with pytest.raises(UnsupportedTrainingSetup, match="without a LoRA adapter"):
            ValueRMModule(backbone="meta-llama/Meta-Llama-3-8B-Instruct", quantization="nf4")
        with mock.patch.object(quant.importlib.util, "find_spec", return_value=None):  # bitsandbytes missing
            with pytest.raises(QuantizationUnavailable, match="needs bitsandbytes"):
                ValueRMModule(backbone="meta-llama/Meta-Llama-3-8B-Instruct", quantization="nf4", lora=LORA)
        build.assert_not_called()
