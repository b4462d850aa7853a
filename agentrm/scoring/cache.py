"""Prefix KV caches reused across candidates and beam depths, bounded in bytes.

Beam search scores, at every depth, K candidates after each beam's history; the history of a beam
at depth ``d+1`` is its parent's history plus the chosen candidate (and the next generation prompt).
:class:`PrefixCache` keeps the per-layer keys/values of token sequences already forwarded, keyed by
their token ids, so a scoring call forwards only the tokens no cached sequence covers:

* the prefix ``prefix_ids[:-1]``: looked up as the longest cached sequence that is a prefix of it
  (at depth ``d+1`` that is the chosen candidate's row of the previous depth), extended by one
  forward of the missing tokens where needed, and stored;
* the K candidates: one batched forward against the prefix's cached past; each candidate's
  keys/values are stored as ``prefix_ids + cand_ids[k]``.

Keys are exact token sequences with positions ``0..n-1``, so a hit is always correct (a truncated
prefix, whose middle steps were dropped, simply matches less).

**Memory.** An entry is a chain of :class:`Segment` s: contiguous copies of consecutive positions that
the cache owns (sized to their tokens, never views of a batched forward's cache). An entry shares its
prefix's segments with the prefix's other entries: a candidate's entry is ``parent segments + the
prefix tokens forwarded in this call (one segment per beam, shared by its K candidates) + its own
tokens``, so a beam-search tree is held once (a trie of segments). A scoring call copies the new
tokens out of its forward's cache (``W x (held + K x L)`` positions per depth instead of keeping the
``B x (past + T)`` batched tensors alive) and concatenates an entry's segments when a lookup hits it.

The bound is in bytes: ``max_bytes`` (default: :data:`AUTO_CUDA_FRACTION` of the device's free memory
when the first entry is stored on CUDA, :data:`CPU_DEFAULT_BYTES` elsewhere) over every model's
entries together, counted exactly as the bytes of the distinct segments the entries reference; the
least recently used entries are evicted until the total fits, and an entry larger than the whole
budget is not stored. ``max_entries`` additionally bounds the entries per model (it bounds the
lookup scan). The budget covers what persists between calls; a call's own forward (its batched
past and activations) comes on top. Tensors are ``[1, kv_heads, n, head_dim]`` per layer.

Cache objects are transformers' ``DynamicCache``, built with ``update(k, v, layer)`` (4.x and 5.x) and
read through ``cache.layers[i].keys`` (5.x) or ``cache.key_cache[i]`` (4.x).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from agentrm.scoring.base import ScoringCounters

KV = list[tuple[Tensor, Tensor]]  # per layer: keys, values [1, kv_heads, n, head_dim]

AUTO_CUDA_FRACTION = 0.25
"""Default budget on CUDA: this fraction of the memory free on the device (the driver's free memory plus
what torch's allocator has reserved but not allocated) when the first entry is stored."""
CPU_DEFAULT_BYTES = 1 << 30
"""Default budget off CUDA: 1 GiB."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str | None, what: str = "cache_bytes") -> int | None:
    """A byte count from ``4096``, ``"512MiB"``, ``"2GB"`` or ``"1.5 GiB"``; ``None`` or ``"auto"``: ``None``.

    Raises:
        ValueError: a negative count or an unreadable string (the message names ``what``).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a byte count, a size such as '2GiB', or 'auto'; got {value!r}")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what} must be a byte count, a size such as '2GiB', or 'auto'; got {value!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be >= 0; got {value!r}")
    return value


def auto_budget(device: torch.device) -> int:
    """The default budget for KV stored on ``device`` (see :data:`AUTO_CUDA_FRACTION`, :data:`CPU_DEFAULT_BYTES`)."""
    if device.type != "cuda":
        return CPU_DEFAULT_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    pooled = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(AUTO_CUDA_FRACTION * (free + pooled))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(base))


def new_cache(kv: KV | None, batch: int) -> Any:
    """A ``DynamicCache`` holding ``kv`` expanded to ``batch`` rows (empty when ``kv`` is ``None``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv or []):
        cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
    return cache


def stack_pasts(kvs: list[KV | None], rows: list[int]) -> Any:
    """A ``DynamicCache`` of ``sum(rows)`` rows: ``kvs[g]`` repeated ``rows[g]`` times, left-padded.

    Every ``kvs[g]`` (``n_g`` positions; ``None`` = 0) ends at position ``past_len = max_g n_g``; the
    ``past_len - n_g`` slots before it are zeros, which the caller's 2D mask must hide (see
    :func:`agentrm.scoring.layouts.cached_layout_many`). With one group this is :func:`new_cache`
    (views, no copy); otherwise the keys/values are copied into one ``[B, kv_heads, past_len, head_dim]``
    tensor per layer.
    """
    if len(kvs) == 1:
        return new_cache(kvs[0], rows[0])
    from transformers import DynamicCache

    cache = DynamicCache()
    some = next((kv for kv in kvs if kv), None)
    if some is None:
        return cache
    past_len = max(kv[0][0].shape[2] if kv else 0 for kv in kvs)
    for layer, (k0, v0) in enumerate(some):
        keys = k0.new_empty((sum(rows), k0.shape[1], past_len, k0.shape[3]))
        values = v0.new_empty((sum(rows), v0.shape[1], past_len, v0.shape[3]))
        b = 0
        for kv, r in zip(kvs, rows):
            pad = past_len - (kv[layer][0].shape[2] if kv else 0)
            keys[b : b + r, :, :pad] = 0  # padding slots (masked): written once, like the keys
            values[b : b + r, :, :pad] = 0
            if kv:
                keys[b : b + r, :, pad:] = kv[layer][0]  # [1, ...] broadcast to the group's r rows
                values[b : b + r, :, pad:] = kv[layer][1]
            b += r
        cache.update(keys, values, layer)
    return cache


def cache_layers(cache: Any) -> KV:
    """Per layer ``(keys, values)`` of a ``DynamicCache`` (transformers 4.x and 5.x)."""
    if hasattr(cache, "layers"):  # transformers 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def crop(kv: KV, n: int) -> KV:
    """The first ``n`` positions of ``kv`` (views)."""
    return [(k[:, :, :n], v[:, :, :n]) for k, v in kv]


class Segment:
    """Keys/values of ``length`` consecutive positions, owned: per layer ``[1, kv_heads, length, head_dim]``.

    Build with :meth:`copy_of` (a fresh contiguous copy of a slice of a forward's cache), so holding a
    segment never keeps a larger tensor alive. ``nbytes`` is the exact size of its tensors.
    """

    __slots__ = ("kv", "length", "nbytes")

    def __init__(self, kv: KV):
        self.kv = kv
        self.length = kv[0][0].shape[2]
        self.nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)

    @classmethod
    def copy_of(cls, layers: KV, row: int, start: int, end: int) -> Segment:
        """Positions ``start .. end-1`` of batch row ``row`` of ``layers`` (``[B, kv_heads, S, head_dim]``), copied."""
        own = dict(memory_format=torch.contiguous_format)
        return cls([(k[row : row + 1, :, start:end].clone(**own), v[row : row + 1, :, start:end].clone(**own))
                    for k, v in layers])

    @property
    def device(self) -> torch.device:
        return self.kv[0][0].device


Parts = tuple[tuple[Segment, int], ...]
"""An entry's keys/values: ``(segment, positions used from its start)`` in order. A part may use only the start of
its segment (where a lookup cropped a longer entry); the whole segment is held and counted."""


def parts_length(parts: Parts) -> int:
    return sum(n for _, n in parts)


def crop_parts(parts: Parts, n: int) -> Parts:
    """The parts covering the first ``n`` positions."""
    out, left = [], n
    for seg, used in parts:
        if left <= 0:
            break
        out.append((seg, min(used, left)))
        left -= used
    return tuple(out)


def materialize(parts: Parts) -> KV | None:
    """``parts`` as one ``[1, kv_heads, n, head_dim]`` tensor per layer (``None`` when empty).

    A single segment used whole is returned as is (no copy); otherwise the segments are concatenated.
    """
    if not parts:
        return None
    if len(parts) == 1:
        seg, used = parts[0]
        return seg.kv if used == seg.length else crop(seg.kv, used)
    whole = [used == seg.length for seg, used in parts]  # most parts: no slicing (it costs ~us each)
    out = []
    for layer in range(len(parts[0][0].kv)):
        out.append(tuple(
            torch.cat([seg.kv[layer][i] if w else seg.kv[layer][i][:, :, :used] for (seg, used), w in zip(parts, whole)],
                      dim=2)
            for i in (0, 1)))
    return out


def _distinct(parts: Parts) -> dict[int, Segment]:
    return {id(seg): seg for seg, _ in parts}


class PrefixCache:
    """LRU store of the keys/values of token sequences per model (``"backbone"``, ``"policy"``, ``"reference"``),
    bounded in bytes over all models together.

    Args:
        max_entries: entries kept per model (``0`` disables storing).
        max_bytes: byte budget (an int or a size string, see :func:`parse_bytes`; ``0`` disables storing);
            ``None`` = :func:`auto_budget` of the device the first stored entry lives on.
        counters: :class:`~agentrm.scoring.base.ScoringCounters` to update (``cache_evictions``,
            ``cache_oversized``, ``cache_peak_bytes``) alongside the attributes below.

    Attributes:
        hits / misses: lookups that found / did not find a cached sequence.
        evictions: entries dropped to stay within ``max_bytes`` or ``max_entries``: ``budget_evictions`` of them
            for the byte budget, ``entry_cap_drops`` for the entry cap (least recently used, e.g. finished
            episodes' prefixes).
        oversized: entries not stored because they alone exceed the budget.
        nbytes / peak_bytes: bytes of the distinct segments held now / at most so far.
        budget: the resolved byte budget (``None`` while an automatic one waits for the first entry).
    """

    def __init__(self, max_entries: int = 64, max_bytes: int | str | None = None,
                 counters: ScoringCounters | None = None):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0; got {max_entries}")
        self.max_entries = max_entries
        self.budget = parse_bytes(max_bytes)
        self.counters = counters
        self._entries: dict[str, OrderedDict[tuple[int, ...], Parts]] = {}
        self._lru: OrderedDict[tuple[str, tuple[int, ...]], None] = OrderedDict()  # all models, oldest first
        self._refs: dict[int, list] = {}  # id(segment) -> [segment, entries referencing it]
        self.nbytes = 0
        self.peak_bytes = 0
        self.hits = self.misses = self.evictions = self.oversized = 0
        self.budget_evictions = self.entry_cap_drops = 0

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        """Drop every entry (frees their segments)."""
        self._entries.clear()
        self._lru.clear()
        self._refs.clear()
        self.nbytes = 0

    def lookup(self, model: str, ids: tuple[int, ...]) -> tuple[Parts, int]:
        """The parts of the longest stored prefix of ``ids``, cropped to its length ``n``, and ``n``.

        A stored sequence longer than ``ids`` that starts with ``ids`` is cropped to ``len(ids)``.
        Returns ``((), 0)`` on a miss. :func:`materialize` turns the parts into keys/values.
        """
        store = self._entries.get(model)
        best_key, best_n = None, 0
        for key in store or ():
            n = min(len(key), len(ids))
            if n > best_n and key[:n] == ids[:n]:
                best_key, best_n = key, n
        if best_key is None:
            self.misses += 1
            return (), 0
        self.hits += 1
        store.move_to_end(best_key)
        self._lru.move_to_end((model, best_key))
        return crop_parts(store[best_key], best_n), best_n

    def lookup_kv(self, model: str, ids: tuple[int, ...]) -> tuple[KV | None, int]:
        """:meth:`lookup` with the parts materialised (``(None, 0)`` on a miss)."""
        parts, n = self.lookup(model, ids)
        return materialize(parts), n

    def store(self, model: str, ids: tuple[int, ...], parts: Parts) -> bool:
        """Keep ``parts`` (``len(ids)`` positions) for ``ids``; evict the least recently used beyond the bounds.

        Returns whether the entry was stored (not when storing is disabled or it alone exceeds the budget).
        """
        if self.max_entries == 0 or self.budget == 0 or not ids:
            return False
        if parts_length(parts) != len(ids):
            raise ValueError(f"parts hold {parts_length(parts)} positions for {len(ids)} ids")
        if self.budget is None:
            self.budget = auto_budget(parts[0][0].device)
        segments = _distinct(parts)
        if sum(s.nbytes for s in segments.values()) > self.budget:
            self.oversized += 1
            if self.counters is not None:
                self.counters.cache_oversized += 1
            return False
        store = self._entries.setdefault(model, OrderedDict())
        if ids in store:
            self._drop(model, ids)
        store[ids] = parts
        self._lru[(model, ids)] = None
        for sid, seg in segments.items():
            ref = self._refs.setdefault(sid, [seg, 0])
            if ref[1] == 0:
                self.nbytes += seg.nbytes
            ref[1] += 1
        while len(store) > self.max_entries:
            self._evict(model, next(iter(store)), for_budget=False)
        while self.nbytes > self.budget:  # the new entry alone fits, so this stops before reaching it
            self._evict(*next(iter(self._lru)), for_budget=True)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        if self.counters is not None:
            self.counters.cache_peak_bytes = max(self.counters.cache_peak_bytes, self.nbytes)
        return True

    def store_kv(self, model: str, ids: tuple[int, ...], kv: KV) -> bool:
        """:meth:`store` of ``kv`` (``len(ids)`` positions) as one owned segment (a copy)."""
        return self.store(model, ids, ((Segment.copy_of(kv, 0, 0, len(ids)), len(ids)),))

    def _drop(self, model: str, ids: tuple[int, ...]) -> None:
        parts = self._entries[model].pop(ids)
        del self._lru[(model, ids)]
        for sid in _distinct(parts):
            ref = self._refs[sid]
            ref[1] -= 1
            if ref[1] == 0:
                self.nbytes -= ref[0].nbytes
                del self._refs[sid]

    def _evict(self, model: str, ids: tuple[int, ...], for_budget: bool = False) -> None:
        """Drop the entry; only drops that keep the byte budget count in ``counters.cache_evictions`` (the
        entry cap's turnover is ordinary LRU reuse, counted in :attr:`entry_cap_drops`)."""
        self._drop(model, ids)
        self.evictions += 1
        if for_budget:
            self.budget_evictions += 1
            if self.counters is not None:
                self.counters.cache_evictions += 1
        else:
            self.entry_cap_drops += 1

    def storage_nbytes(self) -> int:
        """Bytes of the distinct storages behind every entry's tensors, recomputed from the tensors
        (equals :attr:`nbytes` when every segment owns its memory; a check, not for hot paths)."""
        segments = {id(seg): seg for store in self._entries.values() for parts in store.values() for seg, _ in parts}
        storages: dict[int, int] = {}
        for seg in segments.values():
            for t in (t for pair in seg.kv for t in pair):
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())


def extend_prefix(
    cache: PrefixCache, key: str, ids: list[int], forward, device: torch.device,
    found: tuple[Parts, int] | None = None,
) -> tuple[Parts, int, int]:
    """Keys/values of ``ids``: the longest cached prefix plus one forward of the rest.

    Args:
        cache: the store (the extended sequence is stored under ``key``: the found parts plus one new
            segment holding the forwarded positions).
        ids: ``[n]`` token ids (the scoring prefix without its last token).
        forward: ``forward(input_ids[1, m], attention_mask[1, n], past)`` runs the model with ``use_cache``.
        device: where the input ids go.
        found: the result of ``cache.lookup(key, tuple(ids))`` when already done.

    Returns:
        ``(parts, reused, forwarded)``: parts of all of ``ids`` (empty when ``ids`` is), tokens taken from
        the cache, tokens forwarded.
    """
    if not ids:
        return (), 0, 0
    t_ids = tuple(ids)
    parts, n = found if found is not None else cache.lookup(key, t_ids)
    if n == len(ids):
        return parts, n, 0
    past = new_cache(materialize(parts), 1)
    new = torch.tensor([ids[n:]], dtype=torch.long, device=device)
    forward(new, torch.ones((1, len(ids)), dtype=torch.long, device=device), past)
    seg = Segment.copy_of(cache_layers(past), 0, n, len(ids))
    parts = parts + ((seg, seg.length),)
    cache.store(key, t_ids, parts)
    return parts, n, len(ids) - n
