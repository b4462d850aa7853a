"""Prefix KV caches reused across candidates and beam depths.

Beam search scores, at every depth, K candidates after each beam's history; the history of a beam
at depth ``d+1`` is its parent's history plus the chosen candidate (and the next generation prompt).
:class:`PrefixCache` keeps the per-layer keys/values of token sequences already forwarded, keyed by
their token ids, so a scoring call forwards only the tokens no cached sequence covers:

* the prefix ``prefix_ids[:-1]``: looked up as the longest cached sequence that is a prefix of it
  (at depth ``d+1`` that is the chosen candidate's row of the previous depth), extended by one
  forward of the missing tokens (usually the generation prompt), and stored;
* the K candidates: one batched forward of ``[prefix_ids[-1], cand_k]`` rows against the prefix's
  cache expanded to K rows; each row's keys/values are stored as ``prefix_ids + cand_ids[k]``.

Keys are exact token sequences with positions ``0..n-1``, so a hit is always correct (a truncated
prefix, whose middle steps were dropped, simply matches less). Entries are views into the batched
cache tensors of the forward that produced them (no copy); the least recently used entries are
evicted beyond ``max_entries`` per model. Tensors are ``[1, kv_heads, n, head_dim]`` per layer.

Cache objects are transformers' ``DynamicCache``, built with ``update(k, v, layer)`` (4.x and 5.x) and
read through ``cache.layers[i].keys`` (5.x) or ``cache.key_cache[i]`` (4.x).
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

KV = list[tuple[Tensor, Tensor]]  # per layer: keys, values [1, kv_heads, n, head_dim]


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


def cache_row(cache: Any, row: int, length: int, start: int = 0) -> KV:
    """Row ``row``'s positions ``start .. start + length - 1`` of every layer of ``cache`` (views)."""
    pairs = cache_layers(cache)
    end = start + length
    return [(k[row : row + 1, :, start:end], v[row : row + 1, :, start:end]) for k, v in pairs]


class LazyKV:
    """The keys/values of one sequence scattered over column ranges of one row of a batched cache.

    Built for every candidate of a packed cached forward (:func:`agentrm.scoring.layouts.cached_packed_layout`)
    and copied into a contiguous :data:`KV` only when a lookup hits it (one chosen beam per depth), so
    the K-fold copy of the prefix is never made.

    Args:
        layers: per layer ``(keys, values)`` of the forward's cache, ``[B, kv_heads, S, head_dim]``.
        row: the batch row.
        ranges: ``[(start, end), ...]`` column ranges, concatenated in order.
    """

    def __init__(self, layers: KV, row: int, ranges: list[tuple[int, int]]):
        self.layers, self.row, self.ranges = layers, row, ranges

    def __call__(self) -> KV:
        r = self.row
        return [
            tuple(torch.cat([t[r : r + 1, :, a:b] for a, b in self.ranges], dim=2) for t in (k, v))
            for k, v in self.layers
        ]


def cache_layers(cache: Any) -> KV:
    """Per layer ``(keys, values)`` of a ``DynamicCache`` (transformers 4.x and 5.x)."""
    if hasattr(cache, "layers"):  # transformers 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def crop(kv: KV, n: int) -> KV:
    """The first ``n`` positions of ``kv`` (views)."""
    return [(k[:, :, :n], v[:, :, :n]) for k, v in kv]


class PrefixCache:
    """LRU store of the keys/values of token sequences, per model (``"backbone"``, ``"policy"``, ``"reference"``).

    Args:
        max_entries: entries kept per model (``0`` disables storing).

    Attributes:
        hits / misses: lookups that found / did not find a cached sequence.
    """

    def __init__(self, max_entries: int = 64):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0; got {max_entries}")
        self.max_entries = max_entries
        self._entries: dict[str, OrderedDict[tuple[int, ...], KV]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())

    def clear(self) -> None:
        """Drop every entry (frees the tensors they view)."""
        self._entries.clear()

    def lookup(self, model: str, ids: tuple[int, ...]) -> tuple[KV | None, int]:
        """The cached keys/values of the longest stored prefix of ``ids`` and its length ``n``.

        A stored sequence longer than ``ids`` that starts with ``ids`` is cropped to ``len(ids)``.
        Returns ``(None, 0)`` on a miss.
        """
        store = self._entries.get(model)
        best_key, best_n = None, 0
        for key in store or ():
            n = min(len(key), len(ids))
            if n > best_n and key[:n] == ids[:n]:
                best_key, best_n = key, n
        if best_key is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        store.move_to_end(best_key)
        kv = store[best_key]
        if isinstance(kv, LazyKV):  # materialised once, on its first hit
            kv = store[best_key] = kv()
        return (kv if best_n == len(best_key) else crop(kv, best_n)), best_n

    def store(self, model: str, ids: tuple[int, ...], kv: KV | LazyKV) -> None:
        """Keep ``kv`` (``len(ids)`` positions) for ``ids``; evict the least recently used beyond the limit."""
        if self.max_entries == 0 or not ids:
            return
        store = self._entries.setdefault(model, OrderedDict())
        store[ids] = kv
        store.move_to_end(ids)
        while len(store) > self.max_entries:
            store.popitem(last=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct tensors the entries view (an entry shares its forward's batched tensor)."""
        seen: dict[int, int] = {}
        for store in self._entries.values():
            for kv in store.values():
                for k, v in kv.layers if isinstance(kv, LazyKV) else kv:
                    for t in (k, v):
                        base = t._base if t._base is not None else t
                        seen[id(base)] = base.numel() * base.element_size()
        return sum(seen.values())


def extend_prefix(
    cache: PrefixCache, key: str, ids: list[int], forward, device: torch.device,
    found: tuple[KV | None, int] | None = None,
) -> tuple[KV | None, int, int]:
    """Keys/values of ``ids``: the longest cached prefix plus one forward of the rest.

    Args:
        cache: the store (the extended sequence is stored under ``key``).
        ids: ``[n]`` token ids (the scoring prefix without its last token).
        forward: ``forward(input_ids[1, m], attention_mask[1, n], past)`` runs the model with ``use_cache``.
        device: where the input ids go.
        found: the result of ``cache.lookup(key, tuple(ids))`` when already done.

    Returns:
        ``(kv, reused, forwarded)``: ``kv`` for all of ``ids`` (``None`` when ``ids`` is empty), tokens
        taken from the cache, tokens forwarded.
    """
    if not ids:
        return None, 0, 0
    t_ids = tuple(ids)
    kv, n = found if found is not None else cache.lookup(key, t_ids)
    if n == len(ids):
        return kv, n, 0
    past = new_cache(kv, 1)
    new = torch.tensor([ids[n:]], dtype=torch.long, device=device)
    forward(new, torch.ones((1, len(ids)), dtype=torch.long, device=device), past)
    kv = cache_row(past, 0, len(ids))
    cache.store(key, t_ids, kv)
    return kv, n, len(ids) - n
