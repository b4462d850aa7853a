"""The shared scoring driver: tokenise, choose the path (cached, packed, plain), chunk, count work.

Path choice (``path="auto"``): **cached** whenever the models can take a prefix KV cache (any
attention implementation; see :func:`~agentrm.scoring.layouts.caching_unsupported_reason`) and the
scorer needs no prefix-step scores; else **packed** where a custom 4D mask is supported; else
**plain**.

The cached path takes the candidates of several prefixes at once (:meth:`CandidateScorer.score_candidates_many`:
every beam of a depth) and lays them out in one of two ways (``cache_rows``):

* **per prefix** (where the kernel takes a 4D mask): one packed row per prefix, ``[uncached prefix tokens,
  cand_1, ..., cand_K]``, against that prefix's cached past;
* **per candidate** (any kernel, e.g. flash-attention): one row per candidate against the prefix's past
  repeated per row (left-padded across prefixes); a long uncached prefix is forwarded once on its own.

Either way each candidate is stored as its prefix's cached segments, one copy of the prefix tokens
forwarded in this call (shared by the prefix's candidates) and a copy of its own tokens
(:class:`~agentrm.scoring.cache.Segment`): the cache owns what it holds and stays within its byte budget
(``cache_bytes``); nothing of the batched forward outlives the call.

Measured on CPU (``bench/bench_beam_cache.py``, ``bench/RESULTS.md``): beam search W=2, K=4 forwards 5x
(value RM) to 11x (implicit PRM) fewer tokens than the packed path, in 2-4.5x less scoring time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Trajectory
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.packing import LAYER_TYPE_MASK_MODEL_TYPES
from agentrm.scoring.base import SCORING_PATHS, ScoringCounters
from agentrm.scoring.cache import (
    Parts,
    PrefixCache,
    Segment,
    cache_layers,
    crop_parts,
    extend_prefix,
    materialize,
    stack_pasts,
)
from agentrm.scoring.layouts import (
    ScoringLayout,
    cached_layout_many,
    cached_packed_layout,
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
        cache_bytes: the prefix cache's byte budget over all its models (LRU eviction; an int or a size such
            as ``"2GiB"``; ``0`` keeps nothing); ``None`` (default): a quarter of the device's free memory
            when the first entry is stored on CUDA, 1 GiB on CPU (see :mod:`agentrm.scoring.cache`).
            Evictions are counted in ``counters.cache_evictions``.
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
        cache_bytes: int | str | None = None,
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
        self.prefix_cache = PrefixCache(cache_entries, cache_bytes, counters=self.counters)
        self.fold_tokens = fold_tokens
        self.cache_rows: str = "auto"
        """Cached-path rows: ``per_prefix`` (one packed row per prefix, its past stored once; needs a 4D
        mask), ``per_candidate`` (one row per candidate, any attention kernel) or ``auto`` (per prefix
        where the kernel takes a 4D mask)."""
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

        One forward per ``batch_size`` candidates (per model); on the cached path with one row per
        candidate, plus one forward of the prefix tokens no cached sequence covers when there are more
        than ``fold_tokens`` of them.
        """
        return self.score_candidates_many([(prefix, candidates)])[0]

    @torch.no_grad()
    def score_candidates_many(
        self, requests: Sequence[tuple[Trajectory, Sequence[Candidate]]]
    ) -> list[Tensor]:
        """``score_candidates(prefix, candidates)`` for every request (e.g. every beam of one depth).

        On the cached path the candidate rows of all requests share forwards (``batch_size`` rows each,
        pasts left-padded to the longest prefix): one forward per depth instead of one per beam. Other
        paths score request by request. Each result equals scoring its request alone (within fp32
        rounding of a differently shaped batch, ~1e-6).
        """
        toks = [
            tokenize_candidates(
                self.tokenizer, prefix, self._prepare_candidates(cands), self.max_length,
                with_prefix_steps=self._with_prefix_steps,
            )
            for prefix, cands in requests
        ]
        out: list[Tensor | None] = [torch.zeros(0) if not t.cand_ids else None for t in toks]
        live = [i for i, t in enumerate(toks) if t.cand_ids]
        paths = {i: self.choose_path(toks[i]) for i in live}
        dev = self._device()
        cached = [i for i in live if paths[i] == "cached"]
        if cached:
            for i, scores in zip(cached, self._score_cached_many([toks[i] for i in cached], dev)):
                out[i] = scores
        for i in live:
            path = paths[i]
            self.last_path = path
            self.counters.candidates += len(toks[i].cand_ids)
            setattr(self.counters, f"{path}_calls", getattr(self.counters, f"{path}_calls") + 1)
            if path != "cached":
                out[i] = self._score_uncached(toks[i], path, dev)
        return out  # type: ignore[return-value]

    def _score_uncached(self, toks: CandidateTokens, path: str, dev: torch.device) -> Tensor:
        """Packed or plain scores of one prefix's candidates, ``batch_size`` per forward."""
        out, K, n = [], len(toks.cand_ids), self._passes_per_forward
        for c0 in range(0, K, self.batch_size):
            ks = range(c0, min(c0 + self.batch_size, K))
            if path == "packed":
                layout = packed_layout(toks, ks, dev)
            else:
                layout = plain_layout(toks, ks, self._pad_id(), dev)
            out.append(self._score_layout(layout, len(toks.prefix_steps), None).float().cpu())
            self._count(n, n * layout.real_tokens, n * layout.input_ids.numel())
        return torch.cat(out)

    def _cached_prefix(
        self, toks: CandidateTokens, dev: torch.device, fold_all: bool = False
    ) -> tuple[dict[str, Parts], int]:
        """Cached parts (per model) of ``toks``'s prefix but its last ``held`` tokens, and ``held``.

        The prefix tokens no cached sequence covers are forwarded in every candidate row when there are
        at most ``fold_tokens`` of them (typically the generation prompt after a beam's last step), else
        once on their own and stored. ``fold_all`` (one packed row per prefix, where held tokens are
        forwarded once anyway): always in the row.
        """
        P = len(toks.prefix_ids)
        ctx = toks.prefix_ids[:-1]
        keys = [key for key, _ in self._cache_models()]
        found = {key: self.prefix_cache.lookup(key, tuple(ctx)) for key in keys}
        n = min(m for _, m in found.values())
        kvs: dict[str, Parts] = {}
        if fold_all or P - 1 - n <= self.fold_tokens:
            for key in keys:
                kvs[key] = crop_parts(found[key][0], n)
                self.counters.cached_tokens += n
            return kvs, P - n
        for key in keys:
            parts, reused, fwd = extend_prefix(
                self.prefix_cache, key, ctx, lambda i, m, p, key=key: self._prefix_forward(key, i, m, p), dev,
                found=found[key],
            )
            self.counters.cached_tokens += reused
            self._count(1, fwd, fwd)
            kvs[key] = parts
        return kvs, 1

    def _per_prefix_rows(self, toks: Sequence[CandidateTokens]) -> bool:
        if self.cache_rows not in ("auto", "per_prefix", "per_candidate"):
            raise ValueError(f"cache_rows must be auto, per_prefix or per_candidate; got {self.cache_rows!r}")
        if self.cache_rows != "auto":
            return self.cache_rows == "per_prefix"
        ctx = max(t.context_len for t in toks)
        return all(
            packing_unsupported_reason(c, ctx) is None and getattr(c, "model_type", None) not in LAYER_TYPE_MASK_MODEL_TYPES
            for c in self._configs()
        )

    def _score_cached_many(self, toks: Sequence[CandidateTokens], dev: torch.device) -> list[Tensor]:
        """Scores of every candidate of every prefix in ``toks`` against the cached prefixes.

        Per prefix (:meth:`_score_cached_packed`) where the kernel takes a 4D mask, else per candidate:
        rows (all candidates, in request order) go ``batch_size`` per forward; each row's keys/values are
        stored as ``prefix_ids + cand_ids[k]`` for the next depth (:meth:`_store_candidates`).
        """
        if self._per_prefix_rows(toks):
            return self._score_cached_packed(toks, [self._cached_prefix(t, dev, fold_all=True) for t in toks], dev)
        prefixes = [self._cached_prefix(t, dev) for t in toks]
        rows = [(g, k) for g, t in enumerate(toks) for k in range(len(t.cand_ids))]
        scores: list[list[Tensor]] = [[] for _ in toks]
        n_models = len(self._cache_models())
        for r0 in range(0, len(rows), self.batch_size):
            chunk = rows[r0 : r0 + self.batch_size]
            groups = [g for g in dict.fromkeys(g for g, _ in chunk)]
            ks = {g: [k for gg, k in chunk if gg == g] for g in groups}
            layout_groups = [(toks[g], ks[g], prefixes[g][1]) for g in groups]
            layout = cached_layout_many(layout_groups, self._pad_id(), dev)
            pasts = {
                key: stack_pasts([materialize(prefixes[g][0][key]) for g in groups], [len(ks[g]) for g in groups])
                for key, _ in self._cache_models()
            }
            flat = self._score_layout(layout, 0, pasts).float().cpu()
            self._count(n_models, n_models * layout.real_tokens, n_models * layout.input_ids.numel())
            layers = {key: cache_layers(past) for key, past in pasts.items()}
            j, pl = 0, layout.past_len
            for g in groups:
                t, held = toks[g], prefixes[g][1]
                scores[g].append(flat[j : j + len(ks[g])])
                # row j: [past (left-padded to pl), held prefix tokens, candidate]; the held tokens are
                # the same in every row of the group, taken from its first
                spans = [(j + i, pl + held, len(t.cand_ids[k])) for i, k in enumerate(ks[g])]
                self._store_candidates(t, ks[g], prefixes[g][0], layers, (j, pl, pl + held), spans)
                j += len(ks[g])
        return [torch.cat(s) for s in scores]

    def _store_candidates(
        self, t: CandidateTokens, ks: Sequence[int], prefix: dict[str, Parts], layers: dict[str, Any],
        held: tuple[int, int, int], spans: Sequence[tuple[int, int, int]],
    ) -> None:
        """Store ``prefix_ids + cand_ids[k]`` for every ``k`` in ``ks`` after a cached forward, per model:
        ``prefix[key]`` + one copy of the held prefix tokens (row ``held[0]``, columns ``held[1]:held[2]``)
        shared by these candidates + a copy of candidate ``k``'s own tokens (``spans[i] = (row, column, L)``)."""
        held_row, start, end = held
        for key, kv in layers.items():
            shared = prefix[key] + ((Segment.copy_of(kv, held_row, start, end), end - start),)
            for k, (row, col, L) in zip(ks, spans):
                own = Segment.copy_of(kv, row, col, col + L)
                self.prefix_cache.store(key, tuple(t.prefix_ids + t.cand_ids[k]), shared + ((own, L),))

    def _score_cached_packed(
        self, toks: Sequence[CandidateTokens], prefixes: list[tuple[dict[str, Parts], int]], dev: torch.device
    ) -> list[Tensor]:
        """One packed row per prefix (:func:`~agentrm.scoring.layouts.cached_packed_layout`), rows filled up
        to ``batch_size`` candidates per forward; each candidate's keys/values are stored as in
        :meth:`_score_cached_many` (:meth:`_store_candidates`)."""
        rows = [(g, list(range(c0, min(c0 + self.batch_size, len(t.cand_ids)))))
                for g, t in enumerate(toks) for c0 in range(0, len(t.cand_ids), self.batch_size)]
        chunks, cur, size = [], [], 0
        for row in rows:
            if cur and size + len(row[1]) > self.batch_size:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(row)
            size += len(row[1])
        chunks.append(cur)
        scores: list[list[Tensor]] = [[] for _ in toks]
        n_models = len(self._cache_models())
        for chunk in chunks:
            layout, spans = cached_packed_layout([(toks[g], ks, prefixes[g][1]) for g, ks in chunk], dev, self._pad_id())
            pasts = {key: stack_pasts([materialize(prefixes[g][0][key]) for g, _ in chunk], [1] * len(chunk))
                     for key, _ in self._cache_models()}
            flat = self._score_layout(layout, 0, pasts).float().cpu()
            self._count(n_models, n_models * layout.real_tokens, n_models * layout.input_ids.numel())
            layers = {key: cache_layers(past) for key, past in pasts.items()}
            j, pl = 0, layout.past_len
            for g, ks in chunk:
                t, held = toks[g], prefixes[g][1]
                scores[g].append(flat[j : j + len(ks)])
                b = spans[j][0]  # row b: [past (left-padded to pl), held prefix tokens, cand_k1, cand_k2, ...]
                own = [(b, pl + col, L) for _, col, L in spans[j : j + len(ks)]]
                self._store_candidates(t, ks, prefixes[g][0], layers, (b, pl, pl + held), own)
                j += len(ks)
        return [torch.cat(s) for s in scores]

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
