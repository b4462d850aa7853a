"""Prefix KV caches kept per client session across requests, bounded in bytes.

A client that runs a beam search sends, depth after depth, candidates whose prefixes extend the prefixes it
sent before. With a session key (any string the client chooses, e.g. one per scorer or per episode) the
server keeps that session's :class:`~agentrm.scoring.cache.PrefixCache` between requests, so each depth
forwards only the tokens no earlier request of the session covered: a remote beam search costs what a local
one does. Requests without a session get a fresh cache that is dropped after the call (correct, never reused).

Bounds: each session's cache holds at most ``session_bytes`` (its own LRU eviction,
:class:`~agentrm.scoring.cache.PrefixCache`) and ``entries`` entries per model; over all sessions at most
``total_bytes`` and ``max_sessions`` sessions are kept: after every call the least recently used sessions are
dropped whole until both bounds hold. Eviction is safe: it runs in the worker between scoring calls, never
while a call reads a cache, and a dropped entry or session only means a cache miss (the tokens are forwarded
again; scores are unchanged, the cache keys being exact token sequences).
"""

from __future__ import annotations

from collections import OrderedDict

from agentrm.scoring import PrefixCache, ScoringCounters


class SessionCaches:
    """Per-session prefix caches with per-session and total byte bounds (see the module doc).

    Args:
        entries: entries per model in each session's cache.
        session_bytes: byte budget of one session's cache.
        total_bytes: byte budget over all sessions (``>= session_bytes``).
        max_sessions: sessions kept at once.
        counters: the scorer's counters (``cache_evictions`` etc. are counted there).

    Attributes:
        dropped_sessions: sessions dropped to keep the bounds (not counting :meth:`close`).
    """

    def __init__(self, entries: int, session_bytes: int, total_bytes: int, max_sessions: int,
                 counters: ScoringCounters | None = None):
        if session_bytes > total_bytes:
            raise ValueError(f"session_bytes ({session_bytes}) must not exceed total_bytes ({total_bytes})")
        self.entries, self.session_bytes, self.total_bytes = entries, session_bytes, total_bytes
        self.max_sessions = max_sessions
        self.counters = counters
        self._caches: OrderedDict[str, PrefixCache] = OrderedDict()
        self.dropped_sessions = 0

    def __len__(self) -> int:
        return len(self._caches)

    def __contains__(self, key: str) -> bool:
        return key in self._caches

    @property
    def nbytes(self) -> int:
        """Bytes held by every session's cache now."""
        return sum(c.nbytes for c in self._caches.values())

    def ephemeral(self) -> PrefixCache:
        """A cache for one sessionless call (dropped afterwards; bounded like a session's)."""
        return PrefixCache(self.entries, self.session_bytes, counters=self.counters)

    def get(self, key: str) -> PrefixCache:
        """The cache of session ``key`` (made empty the first time), marked most recently used."""
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = PrefixCache(self.entries, self.session_bytes, counters=self.counters)
        self._caches.move_to_end(key)
        return cache

    def close(self, key: str) -> bool:
        """Drop session ``key``'s cache; whether it existed."""
        cache = self._caches.pop(key, None)
        if cache is None:
            return False
        cache.clear()
        return True

    def enforce(self) -> None:
        """Drop the least recently used sessions until at most ``max_sessions`` remain and they hold at most
        ``total_bytes`` (call between scoring calls only)."""
        total = self.nbytes
        while self._caches and (len(self._caches) > self.max_sessions or total > self.total_bytes):
            _, cache = self._caches.popitem(last=False)
            total -= cache.nbytes
            cache.clear()
            self.dropped_sessions += 1

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self._caches), "bytes": self.nbytes, "dropped_sessions": self.dropped_sessions}
