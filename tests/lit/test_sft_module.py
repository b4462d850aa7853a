"""Policy SFT: the loss covers assistant action tokens only, training lowers it, export gives a usable policy."""

from __future__ import annotations

import torch

from agentrm.data.collate import collate_trajectories
from agentrm.data.tiny_tokenizer import train_tiny_tokenizer, trajectory_texts
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.lit.sft_module import PolicySFTModule, action_labels, shifted_token_stats
from agentrm.policies.base import start_history
from agentrm.policies.hf import load_hf_policy
from tests.lit.conftest import TINY_BACKBONE, learnable_trajectories


def _setup(tmp_path):
    trajs = learnable_trajectories(16)
    tok = train_tiny_tokenizer(trajectory_texts(trajs), vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    module = PolicySFTModule(str(tmp_path / "tok"), backbone_config=TINY_BACKBONE, learning_rate=1e-2)
    items = [tokenize_trajectory(module.tokenizer, t) for t in trajs]
    batch = collate_trajectories(items, module.tokenizer.pad_token_id)
    return trajs, module, batch


def test_labels_cover_action_tokens_only(tmp_path):
    trajs, module, batch = _setup(tmp_path)
    labels = action_labels(batch["input_ids"], batch["token_step"])
    assert ((labels != -100) == (batch["token_step"] >= 0)).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all()  # no padding
    tok = module.tokenizer
    for b, t in enumerate(trajs[:4]):
        for i, step in enumerate(t.steps):
            ids = batch["input_ids"][b][batch["token_step"][b] == i]
            assert tok.decode(ids) == step.action + tok.eos_token  # the action and its end-of-turn token
        # instruction and observations are never labelled
        text = tok.decode(labels[b][labels[b] != -100])
        assert "ball" not in text and "wall" not in text and "Go to" not in text
    # the hand-shifted loss equals Hugging Face's internal causal-LM loss with these labels
    out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    loss_sum, n, _ = shifted_token_stats(out.logits, labels)
    assert torch.allclose(loss_sum / n, out.loss, atol=1e-5)
    assert int(n) == int((batch["token_step"] >= 0).sum())


def test_a_few_steps_lower_the_loss_and_export_samples_actions(tmp_path):
    trajs, module, batch = _setup(tmp_path)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        s, n, _ = module._stats(batch)
        return s / n

    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss()) < 0.5 * first
    module.val_loss.reset()
    module.validation_step(batch, 0)
    assert 0.0 <= float(module.val_step_acc.compute()) <= 1.0
    d = module.export(tmp_path / "policy")
    policy = load_hf_policy(d, temperature=1.0, seed=1, max_new_tokens=6)
    hist = start_history("GoToBall", "Go to the ball.")
    acts = policy.propose(None, hist, 3)
    assert len(acts) == 3 and all(isinstance(a, str) for a in acts)
    assert policy.model.generation_config.eos_token_id == module.tokenizer.eos_token_id
