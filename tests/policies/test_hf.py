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


def _long_history():
    h = _history()
    for i in range(3):
        h.steps.append(Step(f"turn {'left' if i % 2 else 'right'}", f"Facing north. A wall {i + 1} ahead and a key to the left."))
    return h


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_requests_equal_one_at_a_time(lm_and_tok, temperature):
    """batch_requests: a reply is the same sample whatever shares its generate batch (batch 1, 3, 16)."""
    model, tok = lm_and_tok
    reqs = [(None, _history(), 3), (None, _long_history(), 2), (None, _history(), 1)]
    outs = []
    for bs in (1, 3, 16):
        pol = HFPolicy(model, tok, temperature=temperature, top_p=0.9, max_new_tokens=6, batch_size=bs, seed=5,
                       batch_requests=True)
        outs.append(pol.propose_many(reqs))
    one = HFPolicy(model, tok, temperature=temperature, top_p=0.9, max_new_tokens=6, seed=5, batch_requests=True)
    outs.append([one.propose(env, h, k) for env, h, k in reqs])
    assert all(o == outs[0] for o in outs[1:]), outs
    assert [len(o) for o in outs[0]] == [3, 2, 1]
    chats = one.chat_many([(_history().to_messages(), 6)])[0]
    assert len(set(chats)) > 1  # per-reply streams differ from one another
    other = HFPolicy(model, tok, temperature=temperature, top_p=0.9, max_new_tokens=6, seed=6, batch_requests=True)
    assert other.propose_many(reqs) != outs[0]  # and depend on the seed


def test_batched_greedy_and_flag(lm_and_tok):
    from agentrm.policies.base import batches_requests

    model, tok = lm_and_tok
    pol = HFPolicy(model, tok, temperature=0.0, max_new_tokens=5, batch_requests=True)
    many = pol.propose_many([(None, _history(), 2), (None, _long_history(), 2)])
    alone = HFPolicy(model, tok, temperature=0.0, max_new_tokens=5)
    assert many == [alone.propose(None, _history(), 2), alone.propose(None, _long_history(), 2)]
    assert batches_requests(pol) and not batches_requests(alone)


def test_per_row_sampler_nucleus_and_streams():
    from agentrm.policies.sampling import PerRowSampler, reply_seed

    scores = torch.tensor([[5.0, 4.0, -3.0, -3.0]] * 2)
    sampler = PerRowSampler([reply_seed(0, 0, 0), reply_seed(0, 0, 1)], 1.0, 0.5)
    for _ in range(20):  # top_p 0.5: only the first token (p = 0.72) survives
        out = sampler(None, scores)
        assert out.argmax(-1).tolist() == [0, 0] and torch.isinf(out).sum() == 6
    wide = PerRowSampler([1, 2], 1.0, 1.0)
    picks = {int(wide(None, torch.zeros(2, 8)).argmax(-1)[0]) for _ in range(40)}
    assert len(picks) > 3  # uniform logits: many tokens drawn
    with pytest.raises(ValueError, match="rows"):
        wide(None, torch.zeros(3, 8))
    top2 = PerRowSampler([3], 1.0, 1.0, top_k=2)
    logits = torch.tensor([[0.0, 3.0, 2.9, 2.8, -1.0]])
    assert {int(top2(None, logits).argmax(-1)) for _ in range(30)} == {1, 2}  # only the two most likely


@pytest.mark.parametrize("batch_requests", [False, True])
def test_a_keyed_call_samples_the_same_replies_wherever_it_comes(lm_and_tok, batch_requests):
    """The judge keys its calls by prompt: a keyed call's samples do not depend on the calls made before it (a
    resumed run, concurrent episodes), only on the key and the seed; unkeyed calls keep the call-counter stream."""
    model, tok = lm_and_tok
    make = lambda seed=3: HFPolicy(model, tok, temperature=1.0, max_new_tokens=6, seed=seed,  # noqa: E731
                                   batch_requests=batch_requests)
    messages = _history().to_messages()
    fresh = make().chat(messages, n=3, key="the prompt")
    late = make()
    late.chat([{"role": "user", "content": "another request"}], n=2)
    late.chat([{"role": "user", "content": "another request"}], n=2, key="another key")
    assert late.chat(messages, n=3, key="the prompt") == fresh
    assert late.chat_many([(messages, 3)], keys=["the prompt"])[0] == fresh
    assert make().chat(messages, n=3, key="other prompt") != fresh  # the key decides the seed
    assert make(seed=4).chat(messages, n=3, key="the prompt") != fresh  # and so does the client's seed
    counted = make()
    assert counted.chat(messages, n=3) == make().chat(messages, n=3)  # unkeyed: the call counter
    with pytest.raises(ValueError, match="2 keys for 1 prompts"):
        counted.chat_many([(messages, 1)], keys=["a", "b"])
