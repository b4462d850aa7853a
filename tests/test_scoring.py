"""Packed candidate scoring equals scoring each candidate alone through the models' ordinary paths."""

from __future__ import annotations

import copy

import pytest
import torch

from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import ChatTemplateError, tokenize_trajectory
from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import ValueRewardModel, aggregate_steps
from agentrm.scoring import (
    ImplicitPRMScorer,
    Scorer,
    ValueRMScorer,
    packing_unsupported_reason,
    tokenize_candidates,
)
from tests.conftest import make_trajectory
from tests.lit.conftest import TINY_BACKBONE

CANDS5 = [
    "turn left",
    "move forward 3 and then pick up the red ball next to the wall",
    "toggle",
    "",
    "go to the red ball",
]
OBS5 = ["You see a key.", "Wall 1 ahead.", "Nothing happens.", "Red ball 2 ahead 1 left, grey box 1 right.", "Done."]
# the value RM scores the state a candidate reaches: candidates carry the environment's observation
STEPS5 = [Step(a, o) for a, o in zip(CANDS5, OBS5)]
ATOL = 1e-4
PATHS = ("cached", "packed", "plain")
# sdpa takes a boolean 4D mask, eager an additive float one: cover both; empty-steps prefix = first step
CASES = [("sdpa", n, c) for n in (0, 3) for c in (STEPS5[1:2], STEPS5)] + [("eager", 3, STEPS5)]
CASE_IDS = [f"{a}-prefix{n}-K{len(c)}" for a, n, c in CASES]


def _sharpen(model: torch.nn.Module) -> None:
    """Scale q/k projections so random attention is peaked: a wrong mask or position shows up clearly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)


def _value_rm(tok, attn: str, activation: str = "none") -> ValueRewardModel:
    torch.manual_seed(0)
    bb = build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), attn_implementation=attn)
    _sharpen(bb)
    model = ValueRewardModel(bb, value_activation=activation)
    torch.nn.init.normal_(model.value_head.weight, std=1.0)
    return model.eval()


def _prm(tok, attn: str) -> ImplicitPRM:
    torch.manual_seed(0)
    prm = ImplicitPRM(
        build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), causal_lm=True, attn_implementation=attn),
        beta=0.5,
    )
    with torch.no_grad():
        for p in prm.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _sharpen(prm.policy)
    prm.policy.eval()
    return prm


def _alone_batch(tok, prefix: Trajectory, cand: str | Step) -> dict[str, torch.Tensor]:
    step = cand if isinstance(cand, Step) else Step(cand, "You see a key.")
    traj = Trajectory(
        prefix.id, prefix.task, prefix.instruction, [*prefix.steps, step], reward=0.0, success=False
    )
    return collate_trajectories([tokenize_trajectory(tok, traj)], tok.pad_token_id)


def _alone(model, tok, prefix: Trajectory, cands: list) -> torch.Tensor:
    """``[K, S]`` step scores of each candidate appended to the prefix as a normal trajectory (``model.score``)."""
    return torch.cat([model.score(_alone_batch(tok, prefix, c)) for c in cands])


@pytest.mark.parametrize(("attn", "n_prefix_steps", "cands"), CASES, ids=CASE_IDS)
def test_value_rm_packed_equals_alone(tiny_tokenizer, attn, n_prefix_steps, cands):
    model = _value_rm(tiny_tokenizer, attn)
    prefix = make_trajectory("p", n_prefix_steps)
    expect = _alone(model, tiny_tokenizer, prefix, cands)[:, -1]
    for path in PATHS:
        scorer = ValueRMScorer(model, tiny_tokenizer, path=path)
        got = scorer.score_candidates(prefix, cands)
        assert scorer.last_path == path and scorer.last_packed is (path == "packed")
        torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)
    assert expect.std() > 0 if len(cands) > 1 else True


@pytest.mark.parametrize(("attn", "n_prefix_steps", "cands"), CASES, ids=CASE_IDS)
def test_prm_packed_equals_alone(tiny_tokenizer, attn, n_prefix_steps, cands):
    prm = _prm(tiny_tokenizer, attn)
    prefix = make_trajectory("p", n_prefix_steps)
    alone = _alone(prm, tiny_tokenizer, prefix, cands)
    expect = alone[:, -1]
    assert expect.abs().max() > 1e-3
    for path in PATHS:
        got = ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path=path).score_candidates(prefix, cands)
        torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)
    # the default ranks by Q_t = the prefix's step rewards plus the candidate's (comparable across beams)
    for pack in (True, False):
        got = ImplicitPRMScorer(prm, tiny_tokenizer, pack=pack).score_candidates(prefix, cands)
        torch.testing.assert_close(got, aggregate_steps(alone, "sum"), atol=ATOL, rtol=0)
        torch.testing.assert_close(got, alone.sum(dim=1), atol=ATOL, rtol=0)
    expect_min = aggregate_steps(alone, "min")
    for pack in (True, False):
        got = ImplicitPRMScorer(prm, tiny_tokenizer, candidate_aggregate="min", pack=pack).score_candidates(
            prefix, cands
        )
        torch.testing.assert_close(got, expect_min, atol=ATOL, rtol=0)


def test_prm_lora_reference_packed(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = build_backbone(config=TINY_BACKBONE, vocab_size=len(tiny_tokenizer), causal_lm=True)
    prm = ImplicitPRM(
        get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
        beta=1.0,
    )
    prefix = make_trajectory("p", 2)
    expect = _alone(prm, tiny_tokenizer, prefix, CANDS5)[:, -1]
    for path in ("packed", "cached"):
        got = ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path=path).score_candidates(prefix, CANDS5)
        torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)


def test_counters(tiny_tokenizer):
    model, prm = _value_rm(tiny_tokenizer, "sdpa"), _prm(tiny_tokenizer, "sdpa")
    prefix = make_trajectory("p", 2)
    toks = tokenize_candidates(tiny_tokenizer, prefix, STEPS5)
    P, lens = len(toks.prefix_ids), [len(c) for c in toks.cand_ids]
    assert len(set(lens)) > 2  # candidates of different lengths

    s = ValueRMScorer(model, tiny_tokenizer, pack=True)
    s.score_candidates(prefix, STEPS5)
    assert s.counters.as_dict() == {
        "candidates": 5,
        "trajectories": 0,
        "forward_passes": 1,
        "forward_tokens": P + sum(lens),
        "padded_tokens": P + sum(lens),
        "cached_tokens": 0,
        "cached_calls": 0,
        "packed_calls": 1,
        "plain_calls": 0,
        "cache_evictions": 0,
        "cache_oversized": 0,
        "cache_peak_bytes": 0,
        "server_wait_ms": 0,
    }
    s = ValueRMScorer(model, tiny_tokenizer, path="cached")  # prefix once (less its last token), then K rows
    s.cache_rows = "per_candidate"  # one row per candidate: the held last prefix token repeated K times
    s.score_candidates(prefix, STEPS5)
    c = s.counters
    assert (c.forward_passes, c.cached_calls, c.cached_tokens) == (2, 1, 0)
    assert c.forward_tokens == (P - 1) + sum(1 + n for n in lens)
    s.score_candidates(prefix, STEPS5)  # the same prefix again: read from the cache, only the rows forwarded
    assert (c.forward_passes, c.cached_tokens) == (3, P - 1)
    assert c.forward_tokens == (P - 1) + 2 * sum(1 + n for n in lens)
    s = ValueRMScorer(model, tiny_tokenizer, path="cached")  # auto on sdpa: one packed row per prefix,
    s.score_candidates(prefix, STEPS5)  # the uncached prefix in it (no forward of its own)
    s.score_candidates(prefix, STEPS5)
    c = s.counters
    assert (c.forward_passes, c.cached_tokens) == (2, P - 1)
    assert c.forward_tokens == P + sum(lens) + (1 + sum(lens))  # held tokens once per row
    s = ValueRMScorer(model, tiny_tokenizer, pack=False, batch_size=2)  # rows of 2, 2, 1 candidates
    s.score_candidates(prefix, STEPS5)
    c = s.counters
    assert (c.candidates, c.forward_passes, c.forward_tokens) == (5, 3, 5 * P + sum(lens))
    assert c.padded_tokens == sum(len(g) * (P + max(g)) for g in (lens[0:2], lens[2:4], lens[4:]))
    toks = tokenize_candidates(tiny_tokenizer, prefix, CANDS5)  # the PRM scores actions only
    P, lens = len(toks.prefix_ids), [len(c) for c in toks.cand_ids]
    p = ImplicitPRMScorer(prm, tiny_tokenizer, path="packed", batch_size=3)  # policy + reference per chunk
    p.score_candidates(prefix, STEPS5)
    assert (p.counters.forward_passes, p.counters.candidates) == (4, 5)
    assert p.counters.forward_tokens == 2 * (2 * P + sum(lens))
    p.counters.reset()
    assert p.counters.forward_passes == 0


def test_score_trajectories(tiny_tokenizer):
    model, prm = _value_rm(tiny_tokenizer, "sdpa", "sigmoid"), _prm(tiny_tokenizer, "sdpa")
    trajs = [make_trajectory(f"t{i}", n) for i, n in enumerate([3, 0, 1, 2])]
    batch = collate_trajectories(
        [tokenize_trajectory(tiny_tokenizer, t) for t in trajs], tiny_tokenizer.pad_token_id
    )
    for scorer, expect, extra in (
        (ValueRMScorer(model, tiny_tokenizer, batch_size=3), model.score_trajectory(batch, "last"), 1),
        (ImplicitPRMScorer(prm, tiny_tokenizer, batch_size=3), prm.score_trajectory(batch, "min"), 0),
    ):
        assert isinstance(scorer, Scorer)
        got = scorer.score_trajectories(trajs)
        assert torch.isnan(expect[1]) and torch.isfinite(got).all()  # the step-less trajectory: no nan
        keep = [0, 2, 3]
        torch.testing.assert_close(got[keep], expect[keep], atol=ATOL, rtol=0)
        # value RM: the initial state's value (one more forward); implicit PRM: Q_0 = 0
        assert (got[1] == 0.0) == isinstance(scorer, ImplicitPRMScorer)
        assert (scorer.counters.trajectories, scorer.counters.forward_passes) == (
            4,
            2 * scorer._passes_per_forward + extra,
        )


def test_truncation_keeps_instruction_and_recent_whole_steps_as_training_does(tiny_tokenizer):
    from agentrm.data.tokenize import tokenize_trajectory

    model = _value_rm(tiny_tokenizer, "sdpa")
    prefix = make_trajectory("p", 4)
    full = tokenize_candidates(tiny_tokenizer, prefix, STEPS5)
    longest = max(len(c) for c in full.cand_ids)
    whole = len(full.prefix_ids) + longest
    max_length = whole - 5  # one step must go
    toks = tokenize_candidates(tiny_tokenizer, prefix, STEPS5, max_length=max_length)
    assert toks.dropped_steps == 1 and toks.truncated > 0 and len(toks.prefix_ids) + longest <= max_length
    # the head (BOS + instruction turn) is kept, then the tail of the prefix: a middle block is cut out
    cut = toks.truncated
    heads = [h for h in range(1, len(toks.prefix_ids)) if toks.prefix_ids == full.prefix_ids[:h] + full.prefix_ids[h + cut :]]
    assert heads and tiny_tokenizer.decode(full.prefix_ids[: heads[0]]).count("<|user|>") == 1
    # the same rule as training: the trajectory prefix + candidate, tokenised for training with the
    # same budget, keeps exactly the same tokens
    for k, c in enumerate(STEPS5):
        traj = make_trajectory("p", 4)
        traj.steps = [*traj.steps, c]
        trained = tokenize_trajectory(tiny_tokenizer, traj, max_length=len(toks.prefix_ids) + len(toks.cand_ids[k]))
        assert trained.first_step == 1
        assert trained.input_ids[: len(toks.prefix_ids) + len(toks.cand_ids[k])] == toks.prefix_ids + toks.cand_ids[k]
    # alone: the truncated prefix + candidate as an ordinary causal sequence
    expect = []
    for c in toks.cand_ids:
        ids = torch.tensor([toks.prefix_ids + c])
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "step_end_idx": torch.tensor([[ids.shape[1] - 1]]),
        }
        expect.append(model.score(batch)[0, 0])
    for path in PATHS:
        got = ValueRMScorer(model, tiny_tokenizer, max_length=max_length, path=path).score_candidates(
            prefix, STEPS5
        )
        torch.testing.assert_close(got, torch.stack(expect), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_candidates(tiny_tokenizer, prefix, STEPS5, max_length=longest)


def test_auto_falls_back_without_custom_mask_support(tiny_tokenizer, monkeypatch):
    model = _value_rm(tiny_tokenizer, "sdpa", "sigmoid")
    prefix = make_trajectory("p", 1)
    packed = ValueRMScorer(model, tiny_tokenizer, path="packed").score_candidates(prefix, STEPS5)
    torch.testing.assert_close(
        packed, _alone(model, tiny_tokenizer, prefix, STEPS5)[:, -1], atol=ATOL, rtol=0
    )
    cfg = copy.copy(model.backbone.config)
    cfg._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in packing_unsupported_reason(cfg)
    assert packing_unsupported_reason(model.backbone.config) is None
    auto = ValueRMScorer(model, tiny_tokenizer, pack="auto")  # auto prefers the prefix cache
    torch.testing.assert_close(auto.score_candidates(prefix, STEPS5), packed, atol=ATOL, rtol=0)
    assert auto.last_path == "cached"
    monkeypatch.setattr("agentrm.models.packing.PACKABLE_MODEL_TYPES", ())  # e.g. an architecture not vetted
    no_cache = "agentrm.scoring.driver.caching_unsupported_reason"
    monkeypatch.setattr(no_cache, lambda cfg, ctx=None: "no cache here")
    auto = ValueRMScorer(model, tiny_tokenizer, pack="auto")
    torch.testing.assert_close(auto.score_candidates(prefix, STEPS5), packed, atol=ATOL, rtol=0)
    assert auto.last_path == "plain" and auto.last_packed is False and auto.counters.forward_passes == 1
    with pytest.raises(ValueError, match="custom 4D mask"):
        ValueRMScorer(model, tiny_tokenizer, pack=True).score_candidates(prefix, STEPS5)
    with pytest.raises(ValueError, match="no cache here"):
        ValueRMScorer(model, tiny_tokenizer, path="cached").score_candidates(prefix, STEPS5)


def test_invalid_template_raises(tiny_tokenizer):
    model = _value_rm(tiny_tokenizer, "sdpa", "sigmoid")
    bad = copy.deepcopy(tiny_tokenizer)
    # the generation prompt opens a turn the assistant messages never use: no shared prefix
    bad.chat_template = tiny_tokenizer.chat_template.replace(
        "<|assistant|>\n{% endif %}", "<|assistant|>\nThink:{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        ValueRMScorer(model, bad).score_candidates(make_trajectory("p", 1), STEPS5)
    bad.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ValueRMScorer(model, bad).score_candidates(make_trajectory("p", 1), STEPS5)


def test_value_rm_rejects_bare_actions(tiny_tokenizer):
    model = _value_rm(tiny_tokenizer, "sdpa")
    with pytest.raises(ValueError, match="observation"):
        ValueRMScorer(model, tiny_tokenizer).score_candidates(make_trajectory("p", 1), CANDS5)


def test_prm_ignores_observations(tiny_tokenizer):
    prm = _prm(tiny_tokenizer, "sdpa")
    prefix = make_trajectory("p", 2)
    scorer = ImplicitPRMScorer(prm, tiny_tokenizer)
    torch.testing.assert_close(scorer.score_candidates(prefix, STEPS5), scorer.score_candidates(prefix, CANDS5))


def test_a_withheld_final_step_is_read_as_the_state_before_it(tiny_tokenizer):
    """Value RM: a trailing withheld step scores the state before it; a trajectory left with no step scores
    the initial state (read at the end of the instruction turn), never nan; candidates read the same state."""
    from agentrm.search.blind import finished_view, withheld

    model = _value_rm(tiny_tokenizer, "sdpa")
    scorer = ValueRMScorer(model, tiny_tokenizer)
    trajs = [make_trajectory("a", 3), make_trajectory("b", 1)]
    blind = scorer.score_trajectories([finished_view(t) for t in trajs])
    shorter = Trajectory("a", trajs[0].task, trajs[0].instruction, trajs[0].steps[:-1], 0.0, False)
    torch.testing.assert_close(blind[0], scorer.score_trajectories([shorter])[0])
    assert torch.isfinite(blind).all()
    empty = Trajectory("b", trajs[1].task, trajs[1].instruction, [], 0.0, False)
    initial = scorer.score_trajectories([empty])[0]
    assert torch.isfinite(initial) and blind[1] == initial
    # the initial state is the value at the token closing the instruction turn
    from agentrm.data.tokenize import render

    text = render(tiny_tokenizer, empty.to_messages())
    ids = tiny_tokenizer(text.rstrip(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = model.backbone(input_ids=ids).last_hidden_state[0, -1]
        expect = model.value_head(h)[0]
    expect = torch.sigmoid(expect) if model.value_activation == "sigmoid" else expect
    torch.testing.assert_close(initial, expect, atol=1e-5, rtol=1e-5)
    # beam candidates: a withheld candidate scores its prefix's state, the others are scored as usual
    prefix = make_trajectory("p", 2)
    cands = [STEPS5[0], withheld(STEPS5[1]), STEPS5[2]]
    got = scorer.score_candidates(prefix, cands)
    visible = scorer.score_candidates(prefix, [STEPS5[0], STEPS5[2]])
    torch.testing.assert_close(got[[0, 2]], visible, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], scorer.score_trajectories([prefix])[0], atol=1e-5, rtol=0)
    root = Trajectory("r", prefix.task, prefix.instruction, [], 0.0, False)
    torch.testing.assert_close(scorer.score_candidates(root, [withheld(STEPS5[0])])[0],
                               scorer.score_trajectories([root])[0])


def test_shared_head_encoding_equals_whole_string_encoding():
    """Encoding the shared head once and each rest separately gives the whole strings' ids and offsets."""
    from agentrm.paths import load_tokenizer
    from agentrm.scoring.tokens import _SPLIT_OK, _encode, encode_shared_head

    for path in ("agentrm/assets/tiny_tokenizer", "agentrm/assets/multi_tokenizer"):
        tok = load_tokenizer(path)
        prefix = make_trajectory("p", 3)
        msgs = prefix.to_messages()
        head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        fulls = [
            tok.apply_chat_template(msgs + [{"role": "assistant", "content": a}, {"role": "user", "content": o}],
                                    tokenize=False)
            for a, o in (("go forward", "You see a wall."), ("pick up the key", " spaced  out "), ("x", ""))
        ]
        first = encode_shared_head(tok, head, fulls)  # checked against whole encoding on first use
        assert _SPLIT_OK[tok] is True
        assert encode_shared_head(tok, head, fulls) == first == _encode(tok, fulls)
