"""Candidate scoring on a GPU in bf16: packed equals plain under sdpa; flash-attention (plain batching:
it cannot take the packed 4D mask) equals sdpa. A 4-layer Llama built from a config, no downloads."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from agentrm.data.schema import Step
from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import ValueRewardModel
from agentrm.scoring import ImplicitPRMScorer, ValueRMScorer
from tests.conftest import make_trajectory

LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048}
ACTIONS = ["turn left", "move forward 3 and then pick up the red ball", "toggle", "go to the red ball"]
STEPS = [Step(a, f"You see {i} walls.") for i, a in enumerate(ACTIONS)]
ATTNS = ["sdpa", pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed"))]
TOL = dict(atol=3e-2, rtol=3e-2)  # bf16 activations; packed and plain run different kernels


def _models(tok, attn: str):
    torch.manual_seed(0)
    bb = build_backbone(config=LLAMA, vocab_size=len(tok), attn_implementation=attn, dtype="bfloat16")
    vrm = ValueRewardModel(bb).cuda().eval()
    torch.nn.init.normal_(vrm.value_head.weight, std=1.0)
    torch.manual_seed(0)
    policy = build_backbone(config=LLAMA, vocab_size=len(tok), causal_lm=True, attn_implementation=attn,
                            dtype="bfloat16")
    prm = ImplicitPRM(policy, beta=0.5)
    with torch.no_grad():
        for p in prm.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vrm, prm.cuda()


def _scores(tok, attn: str, pack: bool) -> tuple[torch.Tensor, torch.Tensor]:
    vrm, prm = _models(tok, attn)
    prefix = make_trajectory("p", 3)
    v = ValueRMScorer(vrm, tok, pack=pack).score_candidates(prefix, STEPS)
    r = ImplicitPRMScorer(prm, tok, include_prefix=False, pack=pack).score_candidates(prefix, ACTIONS)
    return v.float().cpu(), r.float().cpu()


def test_packed_equals_plain_under_sdpa(tiny_tokenizer):
    packed, plain = _scores(tiny_tokenizer, "sdpa", True), _scores(tiny_tokenizer, "sdpa", False)
    for a, b in zip(packed, plain):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("attn", ATTNS)
def test_plain_scoring_agrees_across_attention_implementations(tiny_tokenizer, attn):
    got, sdpa = _scores(tiny_tokenizer, attn, False), _scores(tiny_tokenizer, "sdpa", False)
    for a, b in zip(got, sdpa):
        torch.testing.assert_close(a, b, **TOL)
