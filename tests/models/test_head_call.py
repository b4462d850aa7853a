"""Heads read their weights inside their own forward; only the rows that matter reach the kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import agentrm.models.implicit_prm as implicit_prm_module
from agentrm.models.head_call import call_as_forward, causal_lm_head, final_hidden
from agentrm.models.implicit_prm import ImplicitPRM, action_token_rows
from tests.models.test_implicit_prm import eager_step_rewards, prm_and_batch  # noqa: F401 (fixture)


class GatheredOnlyInForward(nn.Module):
    """A head whose weight is whole only while its forward runs (what ZeRO-3's hooks do): outside, the
    parameter is an empty placeholder."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.full = weight
        self.weight = nn.Parameter(torch.empty(0))
        self.register_forward_pre_hook(lambda m, a: setattr(m.weight, "data", m.full))
        self.register_forward_hook(lambda m, a, o: setattr(m.weight, "data", torch.empty(0)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.T


def test_call_as_forward_reads_the_weight_the_hooks_gathered():
    w = torch.randn(5, 3)
    head = GatheredOnlyInForward(w)
    x = torch.randn(4, 3)
    assert head.weight.numel() == 0  # what a read outside forward sees
    out = call_as_forward(head, lambda m, h: h @ m.weight.T, x)
    torch.testing.assert_close(out, x @ w.T)
    assert "forward" not in head.__dict__ and head.weight.numel() == 0  # restored, released


def test_call_as_forward_restores_forward_after_an_error():
    head = nn.Linear(3, 2)

    def boom(module, h):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        call_as_forward(head, boom, torch.randn(1, 3))
    assert "forward" not in head.__dict__
    assert head(torch.zeros(1, 3)).shape == (1, 2)


def test_final_hidden_is_the_last_layer_without_keeping_every_layer(prm_and_batch):  # noqa: F811
    prm, batch = prm_and_batch
    seen = {}
    prm.policy.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    h = final_hidden(prm.policy, batch["input_ids"], batch["attention_mask"])
    assert not seen.get("output_hidden_states") and seen["logits_to_keep"] == 1
    out = prm.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True)
    torch.testing.assert_close(h, out.hidden_states[-1])
    base = prm.policy.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(h, base.last_hidden_state)


def test_kernels_see_action_rows_only_and_results_are_unchanged(prm_and_batch, monkeypatch):  # noqa: F811
    prm, batch = prm_and_batch
    rows_seen = []
    real = implicit_prm_module.step_logratio

    def spy(hidden, *args, **kwargs):
        rows_seen.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(implicit_prm_module, "step_logratio", spy)
    r = prm.step_rewards(batch)
    n_action = int((batch["token_step"][:, 1:] >= 0).sum())
    B, T = batch["input_ids"].shape
    assert rows_seen == [n_action] and n_action < B * (T - 1) / 2
    torch.testing.assert_close(r, eager_step_rewards(prm, batch), atol=1e-4, rtol=1e-4)


def test_action_token_rows_index_the_next_token_of_each_action_position(prm_and_batch):  # noqa: F811
    _, batch = prm_and_batch
    rows, targets, step_ids, num_steps = action_token_rows(batch)
    B, T = batch["input_ids"].shape
    S = batch["step_end_idx"].shape[1]
    b, t = rows // T, rows % T
    assert num_steps == B * S
    assert torch.equal(targets, batch["input_ids"][b, t + 1])
    assert torch.equal(step_ids, batch["token_step"][b, t + 1] + b * S)


def test_lm_head_is_read_inside_its_forward(prm_and_batch):  # noqa: F811
    """With an lm_head that is whole only during its forward, the step rewards are still right."""
    prm, batch = prm_and_batch
    expected = prm.step_rewards(batch).detach()
    for model in (prm.policy, prm.reference):
        model.lm_head = GatheredOnlyInForward(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        torch.testing.assert_close(prm.step_rewards(batch), expected)
        with pytest.raises(Exception):  # noqa: B017 (the old way: reading it outside forward)
            causal_lm_head(prm.policy, None, input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]) @ prm.policy.lm_head.weight.T


def test_bf16_reference_halves_memory_and_stays_frozen_in_eval(prm_and_batch):  # noqa: F811
    prm, batch = prm_and_batch
    half = ImplicitPRM(prm.policy, copy.deepcopy(prm.reference), beta=prm.beta, reference_dtype="bfloat16")
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert nbytes(half.reference) * 2 == nbytes(prm.reference)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in half.reference.parameters())
    half.train()
    assert half.policy.training and not half.reference.training
    # the bf16 reference's log-probs differ from fp32 ones only by rounding
    with torch.no_grad():
        torch.testing.assert_close(half.step_rewards(batch), prm.step_rewards(batch), atol=2e-2, rtol=5e-2)
