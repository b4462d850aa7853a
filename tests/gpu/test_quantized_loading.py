"""Quantised loading on a real GPU (bitsandbytes); skipped cleanly without CUDA or bitsandbytes."""

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

    model = build_backbone(str(llama_dir), causal_lm=True, quantization=scheme, dtype="bfloat16")
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
def test_qlora_training_steps_lower_the_loss(llama_dir, scheme):
    """A few LoRA steps on a k-bit base for both reward models (the implicit PRM's lm_head is fp32 after
    k-bit preparation: the log-ratio kernel's mixed bf16/fp32 path)."""
    import torch.nn.functional as F
    from peft import prepare_model_for_kbit_training

    from agentrm.lit.trainable import apply_lora
    from agentrm.models.backbone import build_backbone
    from agentrm.models.implicit_prm import ImplicitPRM
    from agentrm.models.value_rm import ValueRewardModel

    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 64), device="cuda")
    token_step = torch.full_like(ids, -1)
    token_step[:, 10:20], token_step[:, 30:31], token_step[:, 40:60] = 0, 1, 2
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_step": token_step,
             "step_end_idx": torch.tensor([[25, 35, 63]] * 4, device="cuda"),
             "step_mask": torch.ones(4, 3, dtype=torch.bool, device="cuda"),
             "success": torch.tensor([1.0, 0.0, 1.0, 0.0], device="cuda")}
    targets = torch.rand(4, 3, device="cuda")

    def value_loss(m):
        return F.mse_loss(m(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"]), targets)

    def prm_loss(m):
        logits = m.outcome_logits(m.step_rewards(batch), batch["step_mask"])
        return F.binary_cross_entropy_with_logits(logits, batch["success"])

    for causal, wrap, loss_fn in ((False, ValueRewardModel, value_loss), (True, ImplicitPRM, prm_loss)):
        base = build_backbone(str(llama_dir), causal_lm=causal, quantization=scheme, dtype="bfloat16")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        model = wrap(apply_lora(base, lora, "CAUSAL_LM" if causal else "FEATURE_EXTRACTION")).cuda().train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        losses = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        assert all(x == x for x in losses) and losses[-1] < losses[0], (wrap.__name__, losses)
