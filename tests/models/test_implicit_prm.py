import pytest
import torch

from agentrm.data.collate import collate_trajectories
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM
from tests.conftest import make_trajectory
from tests.lit.conftest import TINY_BACKBONE


def eager_step_rewards(prm: ImplicitPRM, batch) -> torch.Tensor:
    """Materialise full logits for both models and sum log-ratios over each step's action tokens."""
    def logp(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]

    lp, lr = logp(prm.policy), logp(prm.reference)
    B, S = batch["step_end_idx"].shape
    out = torch.zeros(B, S)
    for b in range(B):
        for t in range(batch["input_ids"].shape[1] - 1):
            s = int(batch["token_step"][b, t + 1])
            if s >= 0:
                out[b, s] = out[b, s] + prm.beta * (lp[b, t] - lr[b, t])
    return out


@pytest.fixture()
def prm_and_batch(tiny_tokenizer):
    torch.manual_seed(0)
    policy = build_backbone(config=TINY_BACKBONE, vocab_size=len(tiny_tokenizer), causal_lm=True)
    prm = ImplicitPRM(policy, beta=0.5)
    with torch.no_grad():  # make policy differ from reference
        for p in prm.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = [tokenize_trajectory(tiny_tokenizer, make_trajectory(f"t{i}", n)) for i, n in enumerate([3, 0, 2])]
    return prm, collate_trajectories(items, tiny_tokenizer.pad_token_id)


def test_step_rewards_match_eager_log_ratio(prm_and_batch):
    prm, batch = prm_and_batch
    r = prm.step_rewards(batch)
    ref = eager_step_rewards(prm, batch)
    torch.testing.assert_close(r, ref, atol=1e-4, rtol=1e-4)
    assert r.abs().sum() > 0
    assert (r[1] == 0).all()  # the zero-step trajectory has no reward
    # gradients flow to the policy only
    r.sum().backward()
    assert prm.policy.get_output_embeddings().weight.grad is not None
    assert all(p.grad is None for p in prm.reference.parameters())


def test_implicit_prm_save_load(prm_and_batch, tmp_path):
    prm, batch = prm_and_batch
    prm.save_pretrained(tmp_path / "p")
    back = ImplicitPRM.from_pretrained(tmp_path / "p")
    torch.testing.assert_close(back.score(batch), prm.score(batch), equal_nan=True)
    assert back.score_trajectory(batch, "sum").shape == (3,)


def test_lora_reference_is_adapter_disabled(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = build_backbone(config=TINY_BACKBONE, vocab_size=len(tiny_tokenizer), causal_lm=True)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prm = ImplicitPRM(policy, beta=1.0)
    assert prm.reference is None
    items = [tokenize_trajectory(tiny_tokenizer, make_trajectory("t", 2))]
    batch = collate_trajectories(items, tiny_tokenizer.pad_token_id)
    r = prm.step_rewards(batch)
    assert r.abs().sum() > 0  # random LoRA weights: policy != reference
    with policy.disable_adapter():
        logits_ref = policy(input_ids=batch["input_ids"]).logits
    logits_pol = policy(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(logits_ref, logits_pol)
