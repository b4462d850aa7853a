"""Model inputs for one scoring forward: packed (one row, 4D mask), plain (padded rows) or cached.

Three layouts of the same tokens (:class:`~agentrm.scoring.tokens.CandidateTokens`), each giving
every candidate's score equal to scoring ``prefix + candidate`` alone as a normal causal sequence:

* **packed**: one row ``[prefix, cand_1, ..., cand_K]`` (``T = P + sum_k L_k``) with a 4D mask in
  which each candidate token sees the prefix and the earlier tokens of its own candidate, and position
  ids restarting at ``P`` per candidate. Needs a kernel that takes a custom mask (see
  :func:`packing_unsupported_reason`).
* **plain**: one right-padded row ``prefix + cand_k`` per candidate; the prefix is repeated K times.
* **cached**: the prefix's keys/values come from a KV cache (:mod:`agentrm.scoring.cache`) and only
  ``K`` rows ``[last prefix token, cand_k]`` (right-padded, ``T = 1 + max_k L_k``) are forwarded,
  with a 2D padding mask over ``past + T`` keys and default positions ``P-1 .. P-1+T-1``. The last
  prefix token is held back from the cache so that the hidden state predicting a candidate's first
  token is computed in this forward. A 2D mask works under sdpa, eager and flash-attention alike.
  Several prefixes (every beam of one depth) share one forward with left-padded pasts and explicit
  position ids (:func:`cached_layout_many`).

How a 4D mask reaches the model (transformers 5.x): ``create_causal_mask`` returns a 4D mask as is;
``sdpa`` takes a boolean ``[B, 1, Q, K]`` mask (``True`` = attend), ``eager`` an additive float mask
(``0`` / ``finfo(dtype).min``; eager adds the mask to the scores, so a boolean one would be silently
wrong). ``flash_attention_2``/``flex_attention``, model types outside an allow-list, and an active
sliding window shorter than the context cannot take one; Gemma 3's sliding-window layers get their
own mask built from the packed position ids (:mod:`agentrm.models.packing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from agentrm.models.packing import (  # noqa: F401  (re-exported: the packing policy lives beside the models)
    PACKABLE_ATTENTION,
    PACKABLE_MODEL_TYPES,
    packed_attention_mask,
    packing_unsupported_reason,
)
from agentrm.scoring.cache import cache_kwarg
from agentrm.scoring.tokens import CandidateTokens


@dataclass
class ScoringLayout:
    """Model inputs for one forward, and where each candidate's quantities live in the flat output.

    Attributes:
        input_ids: ``[B, T]``. position_ids: ``[B, T]`` or ``None`` (default positions, after any past).
        allowed: ``[B, 1, T, T]`` bool (packed) or ``None``; attention_mask_2d: ``[B, past + T]`` (plain, cached).
        end_idx: ``[K]`` flat index into ``B*T`` of each candidate's last token (value read point).
        pred_idx, targets, step_ids: ``[M]`` for every scored action token: flat index of the hidden
            state predicting it, the token id, and its step id (prefix step ``i`` -> ``i``, candidate
            ``k`` -> ``num_prefix_steps + k``).
        num_steps: ``num_prefix_steps + K``. real_tokens: non-padding tokens forwarded.
        past_len: tokens of the cached prefix the rows attend to (cached layout; ``0`` otherwise).
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
    past_len: int = 0


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


def _make_layout(ids, pos, allowed, mask2d, ends, pred, tgt, sid, n, real, device, past_len=0) -> ScoringLayout:
    """A :class:`ScoringLayout` on ``device`` from tensors (``pos``/``allowed``/``mask2d`` may be None) and index lists."""
    as_long = dict(dtype=torch.long, device=device)
    return ScoringLayout(
        input_ids=ids.to(device),
        position_ids=None if pos is None else pos.to(device),
        allowed=None if allowed is None else allowed.to(device),
        attention_mask_2d=None if mask2d is None else mask2d.to(device),
        end_idx=torch.tensor(ends, **as_long),
        pred_idx=torch.tensor(pred, **as_long),
        targets=torch.tensor(tgt, **as_long),
        step_ids=torch.tensor(sid, **as_long),
        num_steps=n,
        real_tokens=real,
        past_len=past_len,
    )


def _layout(ids, pos, allowed, mask2d, toks, ks, cand_pos, first_pred, real, device, past_len=0) -> ScoringLayout:
    pred, tgt, sid, n = _scored_tokens(toks, ks, cand_pos, first_pred)
    ends = [c + len(toks.cand_ids[k]) - 1 for c, k in zip(cand_pos, ks)]
    return _make_layout(ids, pos, allowed, mask2d, ends, pred, tgt, sid, n, real, device, past_len)


def packed_layout(toks: CandidateTokens, ks: Sequence[int], device: torch.device | str = "cpu") -> ScoringLayout:
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
    allowed = (causal & same)[None, None]
    return _layout(torch.tensor([ids]), torch.tensor([pos]), allowed, None, toks, ks, cand_pos, [P - 1] * len(ks), T, device)


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
    first = [c - 1 for c in cand_pos]
    return _layout(input_ids, None, None, mask, toks, ks, cand_pos, first, int(mask.sum()), device)


def _cached_past_len(groups: Sequence[tuple[CandidateTokens, Sequence[int], int]]) -> int:
    """Check cached-layout groups ``(toks, ks, held)``; the longest cached past ``max P - held``."""
    for toks, _, held in groups:
        if toks.prefix_steps:
            raise ValueError("the cached layout scores candidates only (prefix steps live in the cache)")
        if not 1 <= held <= len(toks.prefix_ids):
            raise ValueError(f"held must be in [1, {len(toks.prefix_ids)}]; got {held}")
    return max(len(toks.prefix_ids) - held for toks, _, held in groups)


def cached_layout_many(
    groups: Sequence[tuple[CandidateTokens, Sequence[int], int]], pad_id: int, device: torch.device | str = "cpu"
) -> ScoringLayout:
    """Candidate rows of several prefixes (e.g. every beam of one depth) in one forward.

    Group ``g = (toks, ks, held)`` contributes rows ``[toks.prefix_ids[-held:], cand_k]`` for ``k`` in
    ``ks``, against its cached ``prefix[:-held]`` of ``n_g = P_g - held`` tokens. The pasts are
    left-padded to ``past_len = max_g n_g`` (:func:`agentrm.scoring.cache.stack_pasts`): the 2D mask
    ``[B, past_len + T]`` hides the padding and ``position_ids[b] = n_g + arange(T)`` continues each
    row's own prefix (``None`` for one group: the default positions after its past do), so every row
    equals its candidate scored alone. Rows are in group order; step
    ids number the rows (``0 .. B-1``; the cached layout has no prefix steps).

    Raises:
        ValueError: a group with prefix steps, or ``held`` outside ``[1, P]``.
    """
    past_len = _cached_past_len(groups)
    T = max(held + len(toks.cand_ids[k]) for toks, ks, held in groups for k in ks)
    B = sum(len(ks) for _, ks, _ in groups)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, past_len + T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    pred, tgt, sid, ends = [], [], [], []
    b, real = 0, 0
    for toks, ks, held in groups:
        n = len(toks.prefix_ids) - held
        cand_pos = []
        for k in ks:
            row = toks.prefix_ids[n:] + toks.cand_ids[k]
            input_ids[b, : len(row)] = torch.tensor(row)
            mask[b, past_len - n : past_len + len(row)] = 1
            position_ids[b] = torch.arange(n, n + T)
            cand_pos.append(b * T + held)
            ends.append(b * T + len(row) - 1)
            real += len(row)
            b += 1
        p, t, s, _ = _scored_tokens(toks, ks, cand_pos, [c - 1 for c in cand_pos])
        first_row = b - len(ks)
        pred += p
        tgt += t
        sid += [first_row + j for j in s]  # no prefix steps: s = j, the group's row index
    pos = position_ids if len(groups) > 1 else None
    return _make_layout(input_ids, pos, None, mask, ends, pred, tgt, sid, B, real, device, past_len)


def cached_packed_layout(
    rows: Sequence[tuple[CandidateTokens, Sequence[int], int]], device: torch.device | str = "cpu", pad_id: int = 0
) -> tuple[ScoringLayout, list[tuple[int, int, int]]]:
    """One row per prefix, ``[prefix[-held:], cand_k1, cand_k2, ...]``, against its cached ``prefix[:-held]``.

    The packed layout's block mask over a KV cache: row ``b = (toks, ks, held)`` sees its own past
    (``n_b = P - held`` positions, left-padded to ``past_len = max_b n_b``), its held tokens, and each
    candidate sees only its own earlier tokens besides; positions continue the prefix (``n_b + t``) and
    restart at ``n_b + held`` for every candidate. The past is stored once per prefix, not once per
    candidate as in :func:`cached_layout_many`. Needs a kernel that takes a custom 4D mask
    (:func:`packing_unsupported_reason`) and a model without per-layer-type masks.

    Returns:
        ``(layout, spans)``: ``allowed`` is ``[B, 1, T, past_len + T]``; ``spans[j] = (b, start, L)`` gives
        candidate ``j``'s (in row order) row and first column.
    """
    past_len = _cached_past_len(rows)
    T = max(held + sum(len(toks.cand_ids[k]) for k in ks) for toks, ks, held in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -2, dtype=torch.long)  # -2 padding, -1 held prefix tokens, j candidate j
    past_ok = torch.zeros((B, past_len), dtype=torch.bool)
    pred, tgt, sid, ends, spans = [], [], [], [], []
    real, j = 0, 0
    for b, (toks, ks, held) in enumerate(rows):
        n = len(toks.prefix_ids) - held
        past_ok[b, past_len - n :] = True
        input_ids[b, :held] = torch.tensor(toks.prefix_ids[n:])
        position_ids[b, :held] = torch.arange(n, n + held)
        seg[b, :held] = -1
        col, cand_pos = held, []
        for k in ks:
            L = len(toks.cand_ids[k])
            input_ids[b, col : col + L] = torch.tensor(toks.cand_ids[k])
            position_ids[b, col : col + L] = torch.arange(n + held, n + held + L)
            seg[b, col : col + L] = j
            cand_pos.append(b * T + col)
            ends.append(b * T + col + L - 1)
            spans.append((b, col, L))
            col += L
            j += 1
        real += col
        p, t, sd, _ = _scored_tokens(toks, ks, cand_pos, [b * T + held - 1] * len(ks))
        first = j - len(ks)
        pred += p
        tgt += t
        sid += [first + x for x in sd]
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    same = (seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])  # [B, T(query), T(key)]
    new = causal[None] & same & (seg[:, None, :] != -2)
    new |= torch.eye(T, dtype=torch.bool)[None] & (seg == -2)[:, :, None]  # padding queries see themselves
    allowed = torch.cat([past_ok[:, None, :].expand(B, T, past_len), new], dim=2)[:, None]
    layout = _make_layout(input_ids, position_ids, allowed, None, ends, pred, tgt, sid, j, real, device, past_len)
    return layout, spans


def _window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if getattr(config, "model_type", None) in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        window = None
    return window


def caching_unsupported_reason(config, context_len: int | None = None) -> str | None:
    """Why a model cannot score against a reused prefix KV cache (``None`` if it can).

    The cached path needs only a 2D padding mask (any attention implementation) and a plain
    ``DynamicCache``; a sliding window shorter than the context would make the cache evict keys.
    """
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not scored with a prefix cache"
    window = _window(config)
    if window is not None and (context_len is None or context_len > window):
        return f"sliding_window={window} is active and shorter than the context"
    return None


def attention_mask(layout: ScoringLayout, config, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """The ``attention_mask`` argument: 2D (plain, cached), or the packed 4D mask in the kernel's form
    (bool for sdpa, additive for eager; one per layer type for Gemma 3, see :mod:`agentrm.models.packing`)."""
    if layout.allowed is None:
        return layout.attention_mask_2d
    return packed_attention_mask(layout.allowed, layout.position_ids, config, dtype)


def model_inputs(model, layout: ScoringLayout, past=None) -> dict[str, Any]:
    """Keyword arguments of the model call for ``layout`` (``past``: a cache object for the cached layout)."""
    dtype = next(model.parameters()).dtype
    kwargs: dict[str, Any] = dict(
        input_ids=layout.input_ids,
        attention_mask=attention_mask(layout, model.config, dtype),
        use_cache=past is not None,
    )
    if past is not None:
        kwargs[cache_kwarg(model)] = past
    if layout.position_ids is not None:
        kwargs["position_ids"] = layout.position_ids
    return kwargs


def scored_rows(hidden: Tensor, layout: ScoringLayout) -> Tensor:
    """``[M, H]`` hidden rows that predict the scored tokens (``[B, T, H]`` viewed flat, ``M`` rows copied)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.pred_idx)
