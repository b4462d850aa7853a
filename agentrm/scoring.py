"""Batched candidate scoring for Best-of-N and step-level beam search.

Beam search asks: given a conversation so far (a :class:`Trajectory` prefix whose last
observation is the context) and ``K`` candidate next actions, how good is each? All
candidates share the prefix, so they are **packed** into one sequence::

    [prefix, cand_1, ..., cand_K]          (T = P + sum_k L_k tokens)

with a 4D attention mask in which prefix tokens are causal among themselves and each
candidate token sees the whole prefix plus the earlier tokens of its own candidate, and
with position ids that restart at ``P`` for every candidate. One forward computes all K;
each candidate's score equals scoring ``prefix + candidate`` alone as a normal causal
sequence (the tests check this to 1e-4 in fp32).

Tokenisation. The prefix is the chat-template rendering of ``prefix.to_messages()`` with
``add_generation_prompt=True``; candidate ``k`` is the rest of the rendering with the
candidate as the next assistant turn, through its end-of-turn token (the same action-end
rule as :mod:`agentrm.data.tokenize`). Each ``prefix + candidate`` rendering is tokenised
whole, and the shared prefix is the longest common token prefix that ends before the
first action token, so a BPE merge across the boundary cannot make packed and alone
scoring disagree.

Truncation. With ``max_length``, the budget is per candidate context: if
``P + max_k L_k > max_length`` the prefix loses its oldest whole steps, by the rule training
uses (:func:`agentrm.data.tokenize.oldest_steps_to_drop`): BOS, system prompt and the
instruction turn are kept, then the most recent steps that fit.  Positions are those of the
shortened sequence, exactly as if it were scored alone.  A candidate that does not fit next
to the head (instruction turn) raises ``ValueError``.

How the mask reaches the model (transformers 5.x). ``create_causal_mask`` returns a
4D ``attention_mask`` unchanged (``_preprocess_mask_arguments``: "If the mask is already
4D, simply return as-is"), and LLaMA-family attention forwards it to the kernel:

* ``sdpa``: a boolean ``[B, 1, Q, K]`` mask, ``True`` = attend
  (``F.scaled_dot_product_attention`` semantics);
* ``eager``: an additive float mask in the model dtype, ``0`` = attend and
  ``finfo(dtype).min`` = masked (eager adds the mask to the scores, so a boolean mask
  would be silently wrong).

Gemma 3's sliding-window layers get their own mask built from the packed position ids, so it
packs exactly (:mod:`agentrm.models.packing`). ``flash_attention_2``/``flex_attention`` (and
model types outside an allow-list, or Mistral/Qwen with an active sliding window shorter than
the context) cannot take such a mask: ``pack="auto"`` then falls back to plain batching, one
padded row per candidate with the prefix repeated.

Counters (:class:`ScoringCounters`): ``forward_passes`` counts model forward calls (the
implicit PRM makes two per batch: policy and reference) and ``forward_tokens`` the
non-padding tokens fed through them.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import ChatTemplateError, oldest_steps_to_drop, tokenize_trajectory
from agentrm.kernels import step_logratio, step_values, token_logprobs
from agentrm.models.head_call import call_as_forward, causal_lm_head
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.packing import (  # noqa: F401  (re-exported: the packing policy lives beside the models)
    PACKABLE_ATTENTION,
    PACKABLE_MODEL_TYPES,
    packed_attention_mask,
    packing_unsupported_reason,
)
from agentrm.models.value_rm import AGGREGATIONS, ValueRewardModel, aggregate_steps

PackMode = bool | Literal["auto"]
Candidate = str | Step


@dataclass
class ScoringCounters:
    """Work done by a scorer since construction or :meth:`reset`."""

    candidates: int = 0
    trajectories: int = 0
    forward_passes: int = 0
    forward_tokens: int = 0  # non-padding tokens, summed over forward passes
    padded_tokens: int = 0  # B * T, summed over forward passes (== forward_tokens when packed)

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@runtime_checkable
class Scorer(Protocol):
    """Scores candidate next steps and whole trajectories (higher is better)."""

    counters: ScoringCounters

    def score_candidates(self, prefix: Trajectory, candidates: Sequence[Candidate]) -> Tensor:
        """``[K]`` scores of appending each candidate as the step after ``prefix.steps``.

        A candidate is an action string or a :class:`Step` (action and the observation the
        environment returned for it).  The value RM needs the observation: it scores the
        state a step reaches, read at the end of that observation, as in training.
        """
        ...

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` whole-trajectory scores (``nan`` for a trajectory without a scored step)."""
        ...


# ---------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------
@dataclass
class CandidateTokens:
    """A prefix and K candidates as token ids.

    Attributes:
        prefix_ids: ``[P]`` shared prefix (after dropping the oldest steps when over budget).
        cand_ids: K lists ``[L_k]``: the tokens after the prefix through the token closing the action turn.
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


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_candidates(
    tokenizer,
    prefix: Trajectory,
    candidates: Sequence[Candidate],
    max_length: int | None = None,
    with_prefix_steps: bool = False,
) -> CandidateTokens:
    """Tokenise a prefix and its candidate next actions for packed scoring (see module doc).

    Raises:
        ChatTemplateError: no chat template, a slow tokenizer, or a template whose rendering with
            the generation prompt is not a prefix of the rendering with the candidate turn.
        ValueError: a candidate does not fit ``max_length``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"tokenizer {type(tokenizer).__name__} has no chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("a fast tokenizer (with offset mapping) is required for exact step ends")
    if not candidates:
        return CandidateTokens([], [], [], [])
    msgs = prefix.to_messages()
    head = _render(tokenizer, msgs, True)
    fulls, end_chars, action_chars = [], [], []
    for k, cand in enumerate(candidates):
        action, obs = (cand, None) if isinstance(cand, str) else (cand.action, cand.observation)
        turn = msgs + [{"role": "assistant", "content": action}]
        with_action = _render(tokenizer, turn, False)
        full = with_action if obs is None else _render(tokenizer, turn + [{"role": "user", "content": obs}], False)
        if not (full.startswith(head) and full.startswith(with_action)):
            raise ChatTemplateError(
                f"trajectory {prefix.id}: the chat template's rendering with add_generation_prompt=True is not a "
                f"prefix of the rendering with candidate {k} as the next assistant turn; candidates cannot share "
                "a prefix (nor be located exactly) with this template"
            )
        fulls.append(full)
        end_chars.append(len(full.rstrip()))
        action_chars.append(len(with_action.rstrip()))
    enc = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True)
    ids_all: list[list[int]] = enc["input_ids"]
    starts_all = [[s for s, _ in offs] for offs in enc["offset_mapping"]]
    act_start, act_end, step_end = [], [], []
    for k, (starts, c_end, c_act) in enumerate(zip(starts_all, end_chars, action_chars)):
        j = bisect.bisect_left(starts, c_end) - 1  # closes the candidate's last turn (step_end_idx)
        a = bisect.bisect_left(starts, c_act) - 1  # closes the action turn (action_end_idx in tokenize.py)
        if j < 0 or a < 0:
            raise ChatTemplateError(f"candidate {k}: step end at char {c_end} maps to no token")
        act_start.append(min(bisect.bisect_left(starts, len(head)), a))
        act_end.append(a)
        step_end.append(j)
    shared = min(act_start)  # never share an action token ...
    ref = ids_all[0]
    for ids in ids_all[1:]:  # ... nor a token on which the renderings disagree
        n = 0
        while n < shared and ids[n] == ref[n]:
            n += 1
        shared = n
    if shared < 1:
        raise ChatTemplateError(
            "the candidates share no prefix token; the template must open the conversation"
        )
    prefix_ids = ref[:shared]
    cand_ids = [ids[shared : e + 1] for ids, e in zip(ids_all, step_end)]
    cand_start = [s - shared for s in act_start]
    cand_action_end = [a - shared for a in act_end]
    spans: list[tuple[int, int]] = []
    if with_prefix_steps:
        starts0 = starts_all[0]
        for i in range(len(prefix.steps)):
            before = _render(tokenizer, msgs[: 1 + 2 * i], True)
            upto = _render(tokenizer, msgs[: 2 + 2 * i], False)
            if not (head.startswith(before) and head.startswith(upto)):
                raise ChatTemplateError(f"trajectory {prefix.id}: rendering up to step {i} is not a prefix")
            e = bisect.bisect_left(starts0, len(upto.rstrip())) - 1
            s = min(bisect.bisect_left(starts0, len(before)), e)
            if e >= shared:
                raise ChatTemplateError(f"trajectory {prefix.id}: step {i} ends inside the candidate tokens")
            spans.append((s, e))
    cut, dropped = 0, 0
    longest = max(len(c) for c in cand_ids)
    if max_length is not None and shared + longest > max_length:
        starts0 = starts_all[0]

        def tok_end(text: str) -> int:
            return bisect.bisect_left(starts0, len(text.rstrip())) - 1

        head_len = tok_end(_render(tokenizer, msgs[:1], False)) + 1
        # block i of the prefix starts after step i-1's observation; block n is the candidate's turn
        blocks = [head_len] + [tok_end(_render(tokenizer, msgs[: 3 + 2 * i], False)) + 1 for i in range(len(prefix.steps))]
        dropped = oldest_steps_to_drop(shared + longest, head_len, blocks, max_length)
        if dropped > len(prefix.steps):
            raise ValueError(
                f"a candidate has {longest} tokens; max_length={max_length} leaves no room for it next to the "
                f"instruction turn ({head_len} tokens)"
            )
        cut = blocks[dropped] - head_len
        prefix_ids = prefix_ids[:head_len] + prefix_ids[blocks[dropped] :]
        spans = [(s - cut, e - cut) for i, (s, e) in enumerate(spans) if i >= dropped]
    return CandidateTokens(prefix_ids, cand_ids, cand_start, cand_action_end, spans, cut, dropped)


# ---------------------------------------------------------------------------------------------
# model inputs: packed (one row, 4D mask) or plain (one padded row per candidate)
# ---------------------------------------------------------------------------------------------
@dataclass
class ScoringLayout:
    """Model inputs for one forward, and where each candidate's quantities live in the flat output.

    Attributes:
        input_ids: ``[B, T]``. position_ids: ``[B, T]`` or ``None`` (default positions).
        allowed: ``[B, 1, T, T]`` bool (packed) or ``None``; attention_mask_2d: ``[B, T]`` (plain).
        end_idx: ``[K]`` flat index into ``B*T`` of each candidate's action-end token (value read point).
        pred_idx, targets, step_ids: ``[M]`` for every scored action token: flat index of the hidden
            state predicting it, the token id, and its step id (prefix step ``i`` -> ``i``, candidate
            ``k`` -> ``num_prefix_steps + k``).
        num_steps: ``num_prefix_steps + K``. real_tokens: non-padding tokens.
    """

    input_ids: Tensor
    position_ids: Tensor | None
    allowed: Tensor | None
    attention_mask_2d: Tensor | None
    end_idx: Tensor
    pred_idx: Tensor
    targets: Tensor
    step_ids: Tensor
    num_steps: int
    real_tokens: int


def _scored_tokens(
    toks: CandidateTokens, ks: Sequence[int], cand_pos: Sequence[int], first_pred: Sequence[int]
) -> tuple[list[int], list[int], list[int], int]:
    """Predictor indices, targets and step ids of the prefix steps (row 0) and of candidates ``ks``.

    ``cand_pos[j]`` is the flat index of candidate ``ks[j]``'s first token and ``first_pred[j]`` the
    flat index of the hidden state that predicts it (the last prefix token of its context).
    """
    pred, tgt, sid = [], [], []
    for i, (s, e) in enumerate(toks.prefix_steps):
        pred += range(s - 1, e)
        tgt += toks.prefix_ids[s : e + 1]
        sid += [i] * (e + 1 - s)
    n_pre = len(toks.prefix_steps)
    for j, k in enumerate(ks):
        ids, a = toks.cand_ids[k], toks.cand_start[k]
        for t in range(a, toks.cand_action_end[k] + 1):
            pred.append(first_pred[j] if t == 0 else cand_pos[j] + t - 1)
            tgt.append(ids[t])
            sid.append(n_pre + j)
    return pred, tgt, sid, n_pre + len(ks)


def packed_layout(
    toks: CandidateTokens, ks: Sequence[int], device: torch.device | str = "cpu"
) -> ScoringLayout:
    """One row ``[prefix, cand_ks[0], ...]`` with a block mask and restarting position ids."""
    P = len(toks.prefix_ids)
    ids, pos, seg, cand_pos = list(toks.prefix_ids), list(range(P)), [-1] * P, []
    for j, k in enumerate(ks):
        L = len(toks.cand_ids[k])
        cand_pos.append(len(ids))
        ids += toks.cand_ids[k]
        pos += range(P, P + L)
        seg += [j] * L
    T = len(ids)
    seg_t = torch.tensor(seg, device=device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril_()
    same = (seg_t[None, :] == -1) | (seg_t[None, :] == seg_t[:, None])  # key in prefix or same candidate
    pred, tgt, sid, n = _scored_tokens(toks, ks, cand_pos, [P - 1] * len(ks))
    ends = [c + len(toks.cand_ids[k]) - 1 for c, k in zip(cand_pos, ks)]
    return ScoringLayout(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([pos], device=device),
        allowed=(causal & same)[None, None],
        attention_mask_2d=None,
        end_idx=torch.tensor(ends, device=device),
        pred_idx=torch.tensor(pred, dtype=torch.long, device=device),
        targets=torch.tensor(tgt, dtype=torch.long, device=device),
        step_ids=torch.tensor(sid, dtype=torch.long, device=device),
        num_steps=n,
        real_tokens=T,
    )


def plain_layout(
    toks: CandidateTokens, ks: Sequence[int], pad_id: int, device: torch.device | str = "cpu"
) -> ScoringLayout:
    """One right-padded row ``prefix + cand_k`` per candidate; ordinary causal attention."""
    P = len(toks.prefix_ids)
    T = P + max(len(toks.cand_ids[k]) for k in ks)
    input_ids = torch.full((len(ks), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ks), T), dtype=torch.long)
    for b, k in enumerate(ks):
        row = toks.prefix_ids + toks.cand_ids[k]
        input_ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    cand_pos = [b * T + P for b in range(len(ks))]
    pred, tgt, sid, n = _scored_tokens(toks, ks, cand_pos, [c - 1 for c in cand_pos])
    ends = [c + len(toks.cand_ids[k]) - 1 for c, k in zip(cand_pos, ks)]
    return ScoringLayout(
        input_ids=input_ids.to(device),
        position_ids=None,
        allowed=None,
        attention_mask_2d=mask.to(device),
        end_idx=torch.tensor(ends, device=device),
        pred_idx=torch.tensor(pred, dtype=torch.long, device=device),
        targets=torch.tensor(tgt, dtype=torch.long, device=device),
        step_ids=torch.tensor(sid, dtype=torch.long, device=device),
        num_steps=n,
        real_tokens=int(mask.sum()),
    )


def _model_inputs(model, layout: ScoringLayout) -> dict[str, Tensor | bool]:
    dtype = next(model.parameters()).dtype
    kwargs = dict(
        input_ids=layout.input_ids,
        attention_mask=(
            layout.attention_mask_2d
            if layout.allowed is None
            else packed_attention_mask(layout.allowed, layout.position_ids, model.config, dtype)
        ),
        use_cache=False,
    )
    if layout.position_ids is not None:
        kwargs["position_ids"] = layout.position_ids
    return kwargs


def _forward_hidden(model, layout: ScoringLayout) -> Tensor:
    """Final hidden states ``[B*T, H]`` (after the final norm) of a base (value-RM) backbone."""
    out = model(**_model_inputs(model, layout))
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h.reshape(-1, h.shape[-1])


def _scored_rows(hidden: Tensor, layout: ScoringLayout) -> Tensor:
    """``[M, H]`` hidden rows that predict the scored tokens (``[B, T, H]`` viewed flat, ``M`` rows copied)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.pred_idx)


# ---------------------------------------------------------------------------------------------
# scorers
# ---------------------------------------------------------------------------------------------
class _PackedScorer:
    """Shared driver: tokenise, choose packed/plain, chunk candidates, count work.

    Attributes:
        counters: :class:`ScoringCounters` (cumulative; ``counters.reset()`` to restart).
        last_packed: whether the last :meth:`score_candidates` call packed (``None`` before any).
    """

    _passes_per_forward = 1
    _with_prefix_steps = False

    def __init__(
        self, tokenizer, max_length: int | None = None, pack: PackMode = "auto", batch_size: int = 16
    ):
        if pack not in (True, False, "auto"):
            raise ValueError(f"pack must be True, False or 'auto'; got {pack!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pack = pack
        self.batch_size = batch_size
        self.counters = ScoringCounters()
        self.last_packed: bool | None = None

    def _configs(self) -> list:
        raise NotImplementedError

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _score_layout(self, layout: ScoringLayout, n_prefix_steps: int) -> Tensor:
        """``[k]`` candidate scores of one forward."""
        raise NotImplementedError

    def _use_packing(self, toks: CandidateTokens) -> bool:
        ctx = len(toks.prefix_ids) + max(len(c) for c in toks.cand_ids)
        reasons = [r for r in (packing_unsupported_reason(c, ctx) for c in self._configs()) if r]
        if self.pack is True and reasons:
            raise ValueError(f"pack=True but the model cannot take a custom 4D mask: {reasons[0]}")
        return self.pack is True or (self.pack == "auto" and not reasons)

    @torch.no_grad()
    def score_candidates(self, prefix: Trajectory, candidates: Sequence[Candidate]) -> Tensor:
        """``[K]`` float32 (CPU) scores of each candidate as the step after ``prefix.steps``.

        Packed mode: one forward per ``batch_size`` candidates (prefix recomputed per chunk).
        """
        toks = tokenize_candidates(
            self.tokenizer,
            prefix,
            self._prepare_candidates(candidates),
            self.max_length,
            with_prefix_steps=self._with_prefix_steps,
        )
        if not toks.cand_ids:
            return torch.zeros(0)
        packed = self._use_packing(toks)
        self.last_packed = packed
        dev = self._device()
        out = []
        K = len(toks.cand_ids)
        for c0 in range(0, K, self.batch_size):
            ks = range(c0, min(c0 + self.batch_size, K))
            layout = packed_layout(toks, ks, dev) if packed else plain_layout(toks, ks, self._pad_id(), dev)
            out.append(self._score_layout(layout, len(toks.prefix_steps)).float().cpu())
            self.counters.forward_passes += self._passes_per_forward
            self.counters.forward_tokens += self._passes_per_forward * layout.real_tokens
            self.counters.padded_tokens += self._passes_per_forward * layout.input_ids.numel()
        self.counters.candidates += K
        return torch.cat(out)

    def _prepare_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        return list(candidates)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    def _model_score_trajectory(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` float32 (CPU) whole-trajectory scores via the model's ordinary ``score_trajectory``.

        Tokenised as in training (``tokenize_trajectory``: right truncation to ``max_length``, steps
        past it dropped); a trajectory with no surviving step scores ``nan``.
        """
        dev = self._device()
        out = []
        for i in range(0, len(trajs), self.batch_size):
            items = [
                tokenize_trajectory(self.tokenizer, t, self.max_length)
                for t in trajs[i : i + self.batch_size]
            ]
            batch = {k: v.to(dev) for k, v in collate_trajectories(items, self._pad_id()).items()}
            out.append(self._model_score_trajectory(batch).float().cpu())
            self.counters.forward_passes += self._passes_per_forward
            self.counters.forward_tokens += self._passes_per_forward * int(batch["attention_mask"].sum())
            self.counters.padded_tokens += self._passes_per_forward * batch["input_ids"].numel()
        self.counters.trajectories += len(trajs)
        return torch.cat(out) if out else torch.zeros(0)


class ValueRMScorer(_PackedScorer):
    """Scores candidates by the value RM's value of the state each candidate step reaches.

    As in training (``tokenize_trajectory``), the value is read at the token closing the
    observation turn that follows the action, so candidates must be :class:`Step` objects
    carrying the observation the environment returned (beam search steps a clone of the
    environment for every candidate before scoring).

    Args:
        model: a :class:`ValueRewardModel` (set to eval mode).
        tokenizer: fast tokenizer with a chat template (the one the model was trained with).
        max_length: per-candidate context budget (the prefix's oldest steps are dropped; see module doc).
        pack: ``True`` (packed, error if unsupported), ``False`` (plain batching) or ``"auto"``.
        batch_size: candidates per forward (packed or plain); trajectories per forward.
        aggregate: trajectory aggregation of step values for :meth:`score_trajectories` (``"last"``).
        exclude_final_step: score whole trajectories without their final step, so the
            environment's last reply (which may state the outcome, e.g. "Mission complete.")
            cannot be read: the score is the value of the state before the final action.
            The search harness turns it on by default (``ScorerSpec.exclude_final_step``: search
            must not choose by the outcome the environment reports).  Candidate scoring reads what
            it is given; beam search withholds an
            episode-ending reply from an outcome-blind scorer
            (:func:`agentrm.search.beam.beam_search`).
    """

    def __init__(
        self,
        model: ValueRewardModel,
        tokenizer,
        max_length: int | None = None,
        pack: PackMode = "auto",
        batch_size: int = 16,
        aggregate: str = "last",
        exclude_final_step: bool = False,
    ):
        super().__init__(tokenizer, max_length, pack, batch_size)
        if aggregate not in AGGREGATIONS + ("sum",):
            raise ValueError(f"aggregate must be one of {AGGREGATIONS + ('sum',)}; got {aggregate!r}")
        self.model = model.eval()
        self.aggregate = aggregate
        self.exclude_final_step = exclude_final_step

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` whole-trajectory scores (see ``exclude_final_step``)."""
        if self.exclude_final_step:
            trajs = [dataclasses.replace(t, steps=t.steps[:-1]) for t in trajs]
        return super().score_trajectories(trajs)

    def _prepare_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        bare = [i for i, c in enumerate(candidates) if isinstance(c, str)]
        if bare:
            raise ValueError(
                f"candidate {bare[0]} is a bare action: the value RM scores the state a step reaches, read at "
                "the end of its observation; pass Step(action, observation) after stepping the environment"
            )
        return list(candidates)

    def _configs(self) -> list:
        return [self.model.backbone.config]

    def _device(self) -> torch.device:
        return self.model.value_head.weight.device

    def _score_layout(self, layout: ScoringLayout, n_prefix_steps: int) -> Tensor:
        hidden = _forward_hidden(self.model.backbone, layout)  # [B*T, H]
        sigmoid = self.model.value_activation == "sigmoid"
        return call_as_forward(  # the head's weights are read inside its forward (sharded inference)
            self.model.value_head,
            lambda head, h: step_values(h, head.weight[0], head.bias[0], layout.end_idx, sigmoid=sigmoid),
            hidden,
        )

    def _model_score_trajectory(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.score_trajectory(batch, self.aggregate)


class ImplicitPRMScorer(_PackedScorer):
    """Scores candidates by the implicit PRM's rewards ``r_i = beta * sum over step i's action tokens of log(pi/pi_ref)``.

    Candidates of different beams have different prefixes, so a candidate's own step reward is
    not comparable across beams; the comparable quantity is the cumulative ``Q_t = sum_{i<=t} r_i``
    (the implicit PRM's value of the partial trajectory).  Hence the defaults: ``include_prefix``
    with ``candidate_aggregate="sum"`` ranks beams by ``Q_t``.  Under truncation the sum covers the
    steps that survive (the instruction and the newest steps; see :mod:`agentrm.data.tokenize`).

    Trajectory aggregation for Best-of-N (:meth:`score_trajectories`, ``aggregate``): ``min`` (the
    weakest step, the usual PRM choice and the default), ``sum`` (``Q_T``: the implicit outcome
    reward the PRM was trained on), ``last`` (the last step's reward), ``mean``, ``max``.

    Args:
        model: an :class:`ImplicitPRM` (policy set to eval mode).
        aggregate: trajectory aggregation for :meth:`score_trajectories` (default ``min``).
        include_prefix: ``True`` (default): a candidate's score aggregates the prefix's step rewards
            and its own with ``candidate_aggregate``; ``False``: its own step reward ``r_t`` only.
        candidate_aggregate: ``sum`` (default, ``Q_t``) or any trajectory aggregation.
        tokenizer, max_length, pack, batch_size: as :class:`ValueRMScorer`.
    """

    _passes_per_forward = 2

    def __init__(
        self,
        model: ImplicitPRM,
        tokenizer,
        aggregate: str = "min",
        include_prefix: bool = True,
        max_length: int | None = None,
        pack: PackMode = "auto",
        batch_size: int = 16,
        candidate_aggregate: str = "sum",
    ):
        super().__init__(tokenizer, max_length, pack, batch_size)
        for name, agg in (("aggregate", aggregate), ("candidate_aggregate", candidate_aggregate)):
            if agg not in AGGREGATIONS + ("sum",):
                raise ValueError(f"{name} must be one of {AGGREGATIONS + ('sum',)}; got {agg!r}")
        self.model = model
        model.policy.eval()
        self.aggregate = aggregate
        self.candidate_aggregate = candidate_aggregate
        self.include_prefix = include_prefix
        self._with_prefix_steps = include_prefix

    def _prepare_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        # the step reward covers the action tokens only; observations would be computed for nothing
        return [c if isinstance(c, str) else c.action for c in candidates]

    def _configs(self) -> list:
        ref = self.model.reference
        return [self.model.policy.config] + ([] if ref is None else [ref.config])

    def _device(self) -> torch.device:
        return next(self.model.policy.parameters()).device

    def _reference_logprobs(self, layout: ScoringLayout) -> Tensor:
        """``[M]`` reference log-probs of the scored tokens."""
        if self.model.reference is None:
            ctx, model = self.model.policy.disable_adapter(), self.model.policy
        else:
            ctx, model = contextlib.nullcontext(), self.model.reference
            if next(model.parameters()).device != layout.input_ids.device:
                model.to(layout.input_ids.device)
        with ctx:
            return causal_lm_head(
                model,
                lambda head, h: token_logprobs(_scored_rows(h, layout), head.weight, layout.targets),
                **_model_inputs(model, layout),
            )

    def _score_layout(self, layout: ScoringLayout, n_prefix_steps: int) -> Tensor:
        ref_logp = self._reference_logprobs(layout)
        policy = self.model.policy
        r = causal_lm_head(  # the LM head is read inside its forward (see agentrm.models.head_call)
            policy,
            lambda head, h: step_logratio(
                _scored_rows(h, layout), head.weight, layout.targets, layout.step_ids, ref_logp,
                self.model.beta, layout.num_steps,
            ),
            **_model_inputs(policy, layout),
        )  # [n_prefix_steps + k]
        cand = r[n_prefix_steps:]
        if not self.include_prefix:
            return cand
        steps = torch.cat([r[:n_prefix_steps].expand(len(cand), -1), cand[:, None]], dim=1)  # [k, S_p + 1]
        return aggregate_steps(steps, self.candidate_aggregate)

    def _model_score_trajectory(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.score_trajectory(batch, self.aggregate)
