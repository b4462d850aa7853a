"""The CUDA side of quantised loading (bitsandbytes): weights placed on the GPU by ``device_map``, bf16 compute,
QLoRA steps under bf16 autocast. Skipped cleanly without CUDA (tests/gpu/conftest.py) or without bitsandbytes
(the bare lent GPU machine has none unless the device check installs it).

What runs without a GPU (nf4/int8 loading, QLoRA fit steps of both reward models, nf4 scoring in the search
harness, on bitsandbytes' CPU backend) is tested in ``tests/models/test_quant_cpu.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None,
        reason="needs bitsandbytes: pip install 'agentrm[quant]'",
    ),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 2-layer LLaMA (real architecture, random weights) saved as a local checkpoint."""
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    d = tmp_path_factory.mktemp("llama2l")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_backbone_loads_quantised_with_unquantised_lm_head(llama_dir, scheme):
    import bitsandbytes as bnb

    from agentrm.models.backbone import build_backbone

    model = build_backbone(str(llama_dir), causal_lm=True, quantization=scheme, dtype="bfloat16")  # device: cuda:0
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if scheme == "nf4" else bnb.nn.Linear8bitLt)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_value_rm_qlora_round_trip(llama_dir, tmp_path):
    from agentrm.lit.trainable import apply_lora
    from agentrm.models.backbone import build_backbone
    from agentrm.models.value_rm import ValueRewardModel

    bb = build_backbone(str(llama_dir), quantization="nf4", dtype="bfloat16")
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    model = ValueRewardModel(apply_lora(bb, lora, "FEATURE_EXTRACTION")).cuda().eval()
    batch = {
        "input_ids": torch.randint(0, 512, (2, 16), device="cuda"),
        "attention_mask": torch.ones(2, 16, dtype=torch.long, device="cuda"),
        "step_end_idx": torch.tensor([[5, 15]] * 2, device="cuda"),
    }
    ref = model.score(batch)
    model.save_pretrained(tmp_path / "rm")
    loaded = ValueRewardModel.from_pretrained(tmp_path / "rm", quantization="nf4", dtype="bfloat16").eval()
    torch.testing.assert_close(loaded.score(batch), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("causal_lm", [False, True], ids=["value_rm", "implicit_prm"])
def test_qlora_training_steps_lower_the_loss(llama_dir, scheme, causal_lm):
    """A few LoRA steps on a k-bit base for both reward models under bf16 autocast (the implicit PRM's lm_head is
    fp32 after k-bit preparation: the log-ratio kernel's mixed bf16/fp32 path); same steps as the CPU test."""
    from tests.models.test_quant_cpu import qlora_losses

    losses = qlora_losses(llama_dir, scheme, causal_lm, "cuda")
    assert all(x == x for x in losses) and losses[-1] < losses[0], losses
