import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from agentrm.data.collate import collate_trajectories
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM, action_token_rows
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


class AllocatedBytes(TorchDispatchMode):
    """Bytes of the new tensors each dtype gets while active: op outputs whose storage is none of the inputs'
    (views, ``detach`` and in-place results share an input's storage and are not counted)."""

    def __init__(self):
        super().__init__()
        self.by_dtype: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                self.by_dtype[t.dtype] = self.by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
        return out


def _bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if dtype is None or t.dtype == dtype)


def _reference_logprobs(prm: ImplicitPRM, batch) -> torch.Tensor:
    rows, targets, _, _ = action_token_rows(batch)
    return prm.reference_logprobs(batch, rows, targets)


@pytest.mark.parametrize("tied", [False, True])
def test_in_memory_reference_is_copied_straight_into_its_dtype(tiny_tokenizer, tied):
    """No fp32 duplicate of the policy is made for a bf16 reference; the result equals the old deepcopy + cast."""
    torch.manual_seed(0)
    policy = build_backbone(config={**TINY_BACKBONE, "tie_word_embeddings": tied}, vocab_size=len(tiny_tokenizer),
                            causal_lm=True)
    fp32 = sum(p.numel() * p.element_size() for p in policy.parameters())
    with AllocatedBytes() as old_alloc:
        old = copy.deepcopy(policy).to(torch.bfloat16)  # what ImplicitPRM did before
    with AllocatedBytes() as new_alloc:
        prm = ImplicitPRM(policy, reference_dtype="bfloat16")
    assert old_alloc.by_dtype[torch.float32] >= fp32  # the detector sees the old full fp32 duplicate
    assert new_alloc.by_dtype.get(torch.float32, 0) == 0  # ... and no fp32 tensor at all now
    assert new_alloc.by_dtype[torch.bfloat16] == _bytes(prm.reference) == _bytes(old)
    ref = prm.reference
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in ref.parameters())
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == tied
    assert not {p.data_ptr() for p in ref.parameters()} & {p.data_ptr() for p in policy.parameters()}
    for (name, a), b in zip(ref.state_dict().items(), old.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for (name, a), b in zip(ref.named_buffers(), old.buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    items = [tokenize_trajectory(tiny_tokenizer, make_trajectory(f"t{i}", n)) for i, n in enumerate([3, 2])]
    batch = collate_trajectories(items, tiny_tokenizer.pad_token_id)
    old_prm = ImplicitPRM(policy, reference=old)
    assert torch.equal(_reference_logprobs(prm, batch), _reference_logprobs(old_prm, batch))
    same = ImplicitPRM(policy)  # reference_dtype=None: the policy's dtype, still one copy
    assert {p.dtype for p in same.reference.parameters()} == {torch.float32}
    assert torch.equal(_reference_logprobs(same, batch), _reference_logprobs(ImplicitPRM(policy, copy.deepcopy(policy)),
                                                                             batch))
