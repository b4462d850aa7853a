"""HFPolicy: chat-template prompt, K sampled candidates, reproducible sampling, action parsing."""

from __future__ import annotations

import pytest
import torch

from agentrm.data.schema import Step
from agentrm.models.backbone import build_backbone
from agentrm.paths import load_tokenizer
from agentrm.policies.base import start_history
from agentrm.policies.chat import ChatClient, parse_action
from agentrm.policies.hf import HFPolicy
from tests.lit.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def lm_and_tok():
    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    torch.manual_seed(0)
    return build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), causal_lm=True), tok


def _history():
    h = start_history("babyai/GoToRedBall", "Mission: go to the red ball.\nFacing east. Red ball 2 ahead.")
    h.steps.append(Step("move forward", "Facing east. Red ball 1 ahead."))
    return h


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("move forward", "move forward"),
        ("  turn left.\nbecause the ball is left", "turn left"),
        ("Thought: the ball is ahead.\nAction: `move forward`", "move forward"),
        ("action: pick up\nAction: toggle", "toggle"),
        ("", ""),
    ],
)
def test_parse_action(text, action):
    assert parse_action(text) == action


def test_samples_k_candidates_reproducibly(lm_and_tok):
    model, tok = lm_and_tok
    a = HFPolicy(model, tok, temperature=1.0, max_new_tokens=6, batch_size=2, seed=3)
    b = HFPolicy(model, tok, temperature=1.0, max_new_tokens=6, batch_size=2, seed=3)
    state = torch.random.get_rng_state()
    ca, cb = a.propose(None, _history(), k=5), b.propose(None, _history(), k=5)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert len(ca) == 5 and ca == cb
    assert all(isinstance(c, str) and "\n" not in c for c in ca)
    assert a.generated_tokens > 0 and isinstance(a, ChatClient)
    replies = a.chat(_history().to_messages(), n=4)
    assert len(set(replies)) > 1  # random weights + sampling: the replies differ


def test_greedy_decoding_gives_identical_candidates(lm_and_tok):
    model, tok = lm_and_tok
    pol = HFPolicy(model, tok, temperature=0.0, max_new_tokens=5)
    cands = pol.propose(None, _history(), k=3)
    assert len(cands) == 3 and len(set(cands)) == 1
