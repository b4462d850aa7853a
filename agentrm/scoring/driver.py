"""The shared scoring driver: tokenise, choose the path (cached, packed, plain), chunk, count work.

Path choice (``path="auto"``): **cached** whenever the models can take a prefix KV cache (any
attention implementation; see :func:`~agentrm.scoring.layouts.caching_unsupported_reason`) and the
scorer needs no prefix-step scores; else **packed** where a custom 4D mask is supported; else
**plain**. Measured on CPU (``bench/bench_beam_cache.py``, ``bench/RESULTS.md``): with a cache hit
the cached path forwards only the new tokens; without one it forwards the same tokens as packed
(``P - 1 + K (L + 1)``) but lets the prefix use the causal fast path and the candidates attend to
``P + L`` keys each instead of ``P + K L``, so it is not slower than packing in any measured shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Trajectory
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.scoring.base import SCORING_PATHS, ScoringCounters
from agentrm.scoring.cache import PrefixCache, cache_row, crop, extend_prefix, new_cache
from agentrm.scoring.layouts import (
    ScoringLayout,
    cached_layout,
    caching_unsupported_reason,
    packed_layout,
    packing_unsupported_reason,
    plain_layout,
)
from agentrm.scoring.tokens import Candidate, CandidateTokens, tokenize_candidates

PackMode = bool | Literal["auto"]
ScoringPath = Literal["auto", "cached", "packed", "plain"]


class CandidateScorer:
    """Shared driver of the RM scorers (subclasses supply the models and the per-forward score).

    Args:
        tokenizer: fast tokenizer with a chat template (the one the model was trained with).
        max_length: per-candidate context budget (the prefix's oldest steps are dropped).
        pack: legacy switch: ``True`` = ``path="packed"``, ``False`` = ``path="plain"``, ``"auto"``.
        batch_size: candidates per forward; trajectories per forward.
        path: ``"auto"`` (see module doc), ``"cached"``, ``"packed"`` or ``"plain"`` (overrides ``pack``);
            a forced path the model cannot take raises ``ValueError``.
        cache_entries: prefix-cache entries kept per model (LRU); ``0`` keeps none (every call misses).
        fold_tokens: on the cached path, uncached prefix tokens up to this many are forwarded in every
            candidate row rather than in a forward of their own.

    Attributes:
        counters: :class:`ScoringCounters` (cumulative; ``counters.reset()`` to restart).
        prefix_cache: the :class:`~agentrm.scoring.cache.PrefixCache` (``clear_cache()`` empties it).
        last_path: the path the last :meth:`score_candidates` call took (``None`` before any).
    """

    _passes_per_forward = 1
    _with_prefix_steps = False

    def __init__(
        self,
        tokenizer,
        max_length: int | None = None,
        pack: PackMode = "auto",
        batch_size: int = 16,
        path: ScoringPath | None = None,
        cache_entries: int = 64,
        fold_tokens: int = 16,
    ):
        if pack not in (True, False, "auto"):
            raise ValueError(f"pack must be True, False or 'auto'; got {pack!r}")
        path = path or {True: "packed", False: "plain", "auto": "auto"}[pack]
        if path not in ("auto",) + SCORING_PATHS:
            raise ValueError(f"path must be one of {('auto',) + SCORING_PATHS}; got {path!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.path = path
        self.batch_size = batch_size
        self.counters = ScoringCounters()
        self.prefix_cache = PrefixCache(cache_entries)
        self.fold_tokens = fold_tokens
        self.last_path: str | None = None

    @property
    def last_packed(self) -> bool | None:
        """Whether the last call packed (``None`` before any call)."""
        return None if self.last_path is None else self.last_path == "packed"

    def clear_cache(self) -> None:
        """Free the prefix cache (e.g. between evaluation runs)."""
        self.prefix_cache.clear()

    # -- what subclasses supply ------------------------------------------------------------------
    def _configs(self) -> list:
        raise NotImplementedError

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _cache_models(self) -> list[tuple[str, Any]]:
        """``(key, model)`` pairs whose prefix keys/values are cached."""
        raise NotImplementedError

    def _prefix_forward(self, key: str, input_ids: Tensor, attention_mask: Tensor, past: Any) -> None:
        """Run model ``key`` on ``input_ids[1, m]`` with ``past`` (filled in place)."""
        raise NotImplementedError

    def _score_layout(self, layout: ScoringLayout, n_prefix_steps: int, pasts: dict[str, Any] | None) -> Tensor:
        """``[k]`` candidate scores of one forward (``pasts``: cache per model key on the cached path)."""
        raise NotImplementedError

    def _prepare_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        return list(candidates)

    def _model_score_trajectory(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # -- driver -----------------------------------------------------------------------------------
    def choose_path(self, toks: CandidateTokens) -> str:
        """The path for ``toks`` (see module doc); raises ``ValueError`` when a forced path is impossible."""
        ctx = toks.context_len
        if self.path in ("auto", "cached"):
            reasons = [r for r in (caching_unsupported_reason(c, ctx) for c in self._configs()) if r]
            if self._with_prefix_steps:
                reasons.append("the score aggregates the prefix's own step rewards, which a cache does not hold")
            if not reasons:
                return "cached"
            if self.path == "cached":
                raise ValueError(f"path='cached' but the prefix cannot be cached: {reasons[0]}")
        if self.path in ("auto", "packed"):
            reasons = [r for r in (packing_unsupported_reason(c, ctx) for c in self._configs()) if r]
            if not reasons:
                return "packed"
            if self.path == "packed":
                raise ValueError(f"packed scoring but the model cannot take a custom 4D mask: {reasons[0]}")
        return "plain"

    def _count(self, passes: int, real: int, padded: int) -> None:
        self.counters.forward_passes += passes
        self.counters.forward_tokens += real
        self.counters.padded_tokens += padded

    @torch.no_grad()
    def score_candidates(self, prefix: Trajectory, candidates: Sequence[Candidate]) -> Tensor:
        """``[K]`` float32 (CPU) scores of each candidate as the step after ``prefix.steps``.

        One forward per ``batch_size`` candidates (per model); on the cached path, plus one forward of
        the prefix tokens no cached sequence covers.
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
        path = self.choose_path(toks)
        self.last_path = path
        dev = self._device()
        out = []
        K, n = len(toks.cand_ids), self._passes_per_forward
        for c0 in range(0, K, self.batch_size):
            ks = range(c0, min(c0 + self.batch_size, K))
            if path == "cached":
                out.append(self._score_cached(toks, ks, dev))
                continue
            if path == "packed":
                layout = packed_layout(toks, ks, dev)
            else:
                layout = plain_layout(toks, ks, self._pad_id(), dev)
            out.append(self._score_layout(layout, len(toks.prefix_steps), None).float().cpu())
            self._count(n, n * layout.real_tokens, n * layout.input_ids.numel())
        self.counters.candidates += K
        setattr(self.counters, f"{path}_calls", getattr(self.counters, f"{path}_calls") + 1)
        return torch.cat(out)

    def _score_cached(self, toks: CandidateTokens, ks: Sequence[int], dev: torch.device) -> Tensor:
        """Scores of candidates ``ks`` against the cached prefix; stores each candidate's keys/values.

        The prefix tokens no cached sequence covers are forwarded in every candidate row when there are
        at most ``fold_tokens`` of them (typically the generation prompt after a beam's last step), else
        once on their own and stored.
        """
        P = len(toks.prefix_ids)
        ctx = toks.prefix_ids[:-1]
        keys = [key for key, _ in self._cache_models()]
        found = {key: self.prefix_cache.lookup(key, tuple(ctx)) for key in keys}
        n = min(m for _, m in found.values())
        kvs = {}
        if P - 1 - n <= self.fold_tokens:
            held = P - n
            for key in keys:
                kv = found[key][0]
                kvs[key] = None if n == 0 else crop(kv, n)
                self.counters.cached_tokens += n
        else:
            held = 1
            for key in keys:
                kv, reused, fwd = extend_prefix(
                    self.prefix_cache, key, ctx, lambda i, m, p, key=key: self._prefix_forward(key, i, m, p), dev,
                    found=found[key],
                )
                self.counters.cached_tokens += reused
                self._count(1, fwd, fwd)
                kvs[key] = kv
        pasts = {key: new_cache(kv, len(ks)) for key, kv in kvs.items()}
        layout = cached_layout(toks, ks, self._pad_id(), dev, held)
        scores = self._score_layout(layout, 0, pasts).float().cpu()
        n = len(pasts)
        self._count(n, n * layout.real_tokens, n * layout.input_ids.numel())
        P = len(toks.prefix_ids)
        for key, past in pasts.items():
            for j, k in enumerate(ks):
                seq = tuple(toks.prefix_ids + toks.cand_ids[k])
                self.prefix_cache.store(key, seq, cache_row(past, j, P + len(toks.cand_ids[k])))
        return scores

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    @torch.no_grad()
    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` float32 (CPU) whole-trajectory scores via the model's ordinary ``score_trajectory``.

        Tokenised as in training (``tokenize_trajectory``: over ``max_length`` the oldest whole steps are
        dropped); a trajectory with no surviving step scores ``nan``.
        """
        dev = self._device()
        out = []
        n = self._passes_per_forward
        for i in range(0, len(trajs), self.batch_size):
            items = [tokenize_trajectory(self.tokenizer, t, self.max_length) for t in trajs[i : i + self.batch_size]]
            batch = {k: v.to(dev) for k, v in collate_trajectories(items, self._pad_id()).items()}
            out.append(self._model_score_trajectory(batch).float().cpu())
            self._count(n, n * int(batch["attention_mask"].sum()), n * batch["input_ids"].numel())
        self.counters.trajectories += len(trajs)
        return torch.cat(out) if out else torch.zeros(0)
