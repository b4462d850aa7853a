"""Tokenised layout of a prefix and K candidate next steps (shared by every scoring path).

The prefix is the chat-template rendering of ``prefix.to_messages()`` with
``add_generation_prompt=True``; candidate ``k`` is the rest of the rendering with the candidate as
the next assistant turn (and, for a :class:`~agentrm.data.schema.Step`, its observation turn),
through the token closing its last turn: the same boundaries as training
(:mod:`agentrm.data.tokenize`, whose rendering and offset helpers are used here). Each
``prefix + candidate`` rendering is tokenised whole, and the shared prefix is the longest common
token prefix that ends before the first action token, so a BPE merge across the boundary cannot make
shared-prefix and alone scoring disagree.

Truncation. With ``max_length``, the budget is per candidate context: if ``P + max_k L_k >
max_length`` the prefix loses its oldest whole steps by the one rule training uses
(:func:`agentrm.data.tokenize.oldest_steps_to_drop`): the head (BOS, system prompt, instruction turn)
is kept, then the most recent steps that fit. A candidate that does not fit next to the head raises
``ValueError``.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import (
    ChatTemplateError,
    head_tokens,
    last_token_before,
    oldest_steps_to_drop,
    render,
    require_chat_tokenizer,
)

Candidate = str | Step


@dataclass
class CandidateTokens:
    """A prefix and K candidates as token ids.

    Attributes:
        prefix_ids: ``[P]`` shared prefix (after dropping the oldest steps when over budget).
        cand_ids: K lists ``[L_k]``: the tokens after the prefix through the token closing the candidate.
        cand_start / cand_action_end: ``[K]`` offsets in ``cand_ids[k]`` of the first action
            token and of the token closing the action turn (the PRM sums log-ratios over
            ``cand_ids[k][cand_start[k] : cand_action_end[k] + 1]``); the last token of
            ``cand_ids[k]`` closes the candidate's observation turn when it has one.
        prefix_steps: ``(start, end)`` token spans (inclusive) in ``prefix_ids`` of the prefix's
            steps that survive truncation whole (only filled when requested).
        truncated: number of prefix tokens removed (the dropped steps' tokens).
        dropped_steps: number of the prefix's oldest steps removed.
    """

    prefix_ids: list[int]
    cand_ids: list[list[int]]
    cand_start: list[int]
    cand_action_end: list[int] = field(default_factory=list)
    prefix_steps: list[tuple[int, int]] = field(default_factory=list)
    truncated: int = 0
    dropped_steps: int = 0

    @property
    def context_len(self) -> int:
        """The longest ``prefix + candidate`` in tokens."""
        return len(self.prefix_ids) + max((len(c) for c in self.cand_ids), default=0)


_SPLIT_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> split verified exact


def _encode(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [[s for s, _ in offs] for offs in enc["offset_mapping"]]


def _last_special(tokenizer, head: str) -> int:
    """Start of the last special added token in ``head`` that can serve as a hard boundary (``-1``: none).

    A token that strips whitespace on its left would swallow the boundary's neighbour, so it is not used.
    """
    best = -1
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False) and not getattr(tok, "lstrip", False) and not getattr(tok, "single_word", False):
            best = max(best, head.rfind(tok.content))
    return best


def encode_shared_head(tokenizer, head: str, fulls: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and token start offsets of every ``full`` (all start with ``head``), as whole-string encoding.

    A fast tokenizer splits its input at added tokens before anything else, so with ``s`` the start of
    the last special token in ``head``, ``encode(full) == encode(full[:s]) + encode(full[s:])``: the
    shared ``full[:s]`` is encoded once and only the K short rests separately (the rest starts with the
    special token, so the text after it is encoded as in the whole string). Verified once per tokenizer
    against whole-string encoding; a tokenizer where it does not hold is encoded whole from then on.
    """
    s = _last_special(tokenizer, head)
    try:
        verified = _SPLIT_OK.get(tokenizer)
    except TypeError:  # not weak-referenceable: no memory of a check, so encode whole
        return _encode(tokenizer, fulls)
    if s <= 0 or verified is False:
        return _encode(tokenizer, fulls)
    ids, starts = _encode(tokenizer, [fulls[0][:s]] + [f[s:] for f in fulls])
    head_ids, head_starts = ids[0], starts[0]
    ids_all = [head_ids + r for r in ids[1:]]
    starts_all = [head_starts + [x + s for x in r] for r in starts[1:]]
    if verified is None:
        whole = _encode(tokenizer, fulls)
        _SPLIT_OK[tokenizer] = whole == (ids_all, starts_all)
        return whole
    return ids_all, starts_all


def _split(cand: Candidate) -> tuple[str, str | None]:
    return (cand, None) if isinstance(cand, str) else (cand.action, cand.observation)


def tokenize_candidates(
    tokenizer,
    prefix: Trajectory,
    candidates: Sequence[Candidate],
    max_length: int | None = None,
    with_prefix_steps: bool = False,
) -> CandidateTokens:
    """Tokenise a prefix and its candidate next steps (see the module doc).

    Raises:
        ChatTemplateError: no chat template, a slow tokenizer, or a template whose rendering with
            the generation prompt is not a prefix of the rendering with the candidate turn.
        ValueError: a candidate does not fit ``max_length``.
    """
    require_chat_tokenizer(tokenizer)
    if not candidates:
        return CandidateTokens([], [], [], [])
    msgs = prefix.to_messages()
    head = render(tokenizer, msgs, True)
    fulls, end_chars, action_chars = _renderings(tokenizer, prefix, msgs, head, candidates)
    ids_all, starts_all = encode_shared_head(tokenizer, head, fulls)
    act_start, act_end, step_end = [], [], []
    for k, (starts, c_end, c_act) in enumerate(zip(starts_all, end_chars, action_chars)):
        j = last_token_before(starts, c_end, f"candidate {k}: step end")  # step_end_idx in tokenize.py
        a = last_token_before(starts, c_act, f"candidate {k}: action end")  # action_end_idx
        act_start.append(min(bisect.bisect_left(starts, len(head)), a))
        act_end.append(a)
        step_end.append(j)
    shared = _shared_length(ids_all, min(act_start))
    prefix_ids = ids_all[0][:shared]
    cand_ids = [ids[shared : e + 1] for ids, e in zip(ids_all, step_end)]
    starts0 = starts_all[0]
    spans = _prefix_step_spans(tokenizer, prefix, msgs, head, starts0, shared) if with_prefix_steps else []
    cut, dropped = 0, 0
    longest = max(len(c) for c in cand_ids)
    if max_length is not None and shared + longest > max_length:
        head_len = head_tokens(tokenizer, msgs, starts0)
        dropped, cut = _truncation(tokenizer, prefix, msgs, starts0, head_len, shared + longest, longest, max_length)
        prefix_ids = prefix_ids[:head_len] + prefix_ids[head_len + cut :]
        spans = [(s - cut, e - cut) for i, (s, e) in enumerate(spans) if i >= dropped]
    return CandidateTokens(prefix_ids, cand_ids, [s - shared for s in act_start], [a - shared for a in act_end],
                           spans, cut, dropped)


def _renderings(tokenizer, prefix: Trajectory, msgs: list[dict[str, str]], head: str,
                candidates: Sequence[Candidate]) -> tuple[list[str], list[int], list[int]]:
    """Each candidate's whole rendering, and where its step and its action end (characters)."""
    fulls, end_chars, action_chars = [], [], []
    for k, cand in enumerate(candidates):
        action, obs = _split(cand)
        turn = msgs + [{"role": "assistant", "content": action}]
        with_action = render(tokenizer, turn)
        full = with_action if obs is None else render(tokenizer, turn + [{"role": "user", "content": obs}])
        if not (full.startswith(head) and full.startswith(with_action)):
            raise ChatTemplateError(
                f"trajectory {prefix.id}: the chat template's rendering with add_generation_prompt=True is not a "
                f"prefix of the rendering with candidate {k} as the next assistant turn; candidates cannot share "
                "a prefix (nor be located exactly) with this template"
            )
        fulls.append(full)
        end_chars.append(len(full.rstrip()))
        action_chars.append(len(with_action.rstrip()))
    return fulls, end_chars, action_chars


def _shared_length(ids_all: list[list[int]], first_action: int) -> int:
    """Tokens every candidate shares: never an action token, nor a token on which the renderings disagree."""
    shared, ref = first_action, ids_all[0]
    for ids in ids_all[1:]:
        n = 0
        while n < shared and ids[n] == ref[n]:
            n += 1
        shared = n
    if shared < 1:
        raise ChatTemplateError("the candidates share no prefix token; the template must open the conversation")
    return shared


def _prefix_step_spans(tokenizer, prefix: Trajectory, msgs: list[dict[str, str]], head: str, starts0: list[int],
                       shared: int) -> list[tuple[int, int]]:
    """``(first action token, action end)`` of each step of the prefix (for scores over the prefix's steps)."""
    spans = []
    for i in range(len(prefix.steps)):
        before = render(tokenizer, msgs[: 1 + 2 * i], True)
        upto = render(tokenizer, msgs[: 2 + 2 * i])
        if not (head.startswith(before) and head.startswith(upto)):
            raise ChatTemplateError(f"trajectory {prefix.id}: rendering up to step {i} is not a prefix")
        e = last_token_before(starts0, len(upto.rstrip()), f"step {i} end")
        s = min(bisect.bisect_left(starts0, len(before)), e)
        if e >= shared:
            raise ChatTemplateError(f"trajectory {prefix.id}: step {i} ends inside the candidate tokens")
        spans.append((s, e))
    return spans


def _truncation(tokenizer, prefix: Trajectory, msgs: list[dict[str, str]], starts0: list[int], head_len: int,
                n_tokens: int, longest: int, max_length: int) -> tuple[int, int]:
    """``(oldest prefix steps dropped, tokens cut after the head)`` by the one truncation rule."""
    # block i of the prefix starts after step i-1's observation; block n is the candidate's turn
    blocks = [head_len] + [
        last_token_before(starts0, len(render(tokenizer, msgs[: 3 + 2 * i]).rstrip())) + 1
        for i in range(len(prefix.steps))
    ]
    dropped = oldest_steps_to_drop(n_tokens, head_len, blocks, max_length)
    if dropped > len(prefix.steps):
        raise ValueError(
            f"a candidate has {longest} tokens; max_length={max_length} leaves no room for it next to the "
            f"instruction turn ({head_len} tokens)"
        )
    return dropped, blocks[dropped] - head_len
