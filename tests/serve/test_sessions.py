"""Per-session prefix caches: each session bounded by its budget, all sessions by the total; least recently
used sessions dropped whole, between calls."""

from __future__ import annotations

import torch

from agentrm.scoring import ScoringCounters
from agentrm.serve.sessions import SessionCaches


def _kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))]  # 2 * 2*n*4 floats = 64n bytes


def test_sessions_are_bounded_per_session_and_in_total():
    counters = ScoringCounters()
    caches = SessionCaches(entries=16, session_bytes=640, total_bytes=1500, max_sessions=3, counters=counters)
    a = caches.get("a")
    for i in range(12):  # 12 entries of 64 bytes into a 640-byte session: its own LRU keeps it within
        a.store_kv("backbone", tuple(range(i, i + 1)), _kv(1))
    assert a.nbytes <= 640 and counters.cache_evictions == a.budget_evictions == 2 and a.entry_cap_drops == 0
    for key in ("b", "c"):
        cache = caches.get(key)
        for i in range(8):
            cache.store_kv("backbone", (100 + i,), _kv(1))
    caches.enforce()
    assert caches.nbytes <= 1500 and "a" not in caches  # the least recently used session went first
    assert {"b", "c"} <= {k for k in ("a", "b", "c") if k in caches}
    caches.get("b")  # b is now more recent than c
    for key in ("d", "e"):
        caches.get(key).store_kv("backbone", (7,), _kv(1))
    caches.enforce()
    assert len(caches) == 3 and "c" not in caches and "b" in caches
    assert caches.close("b") and not caches.close("b")
    assert caches.stats()["dropped_sessions"] == 2


def test_a_sessionless_cache_is_fresh_every_time():
    caches = SessionCaches(entries=4, session_bytes=1000, total_bytes=1000, max_sessions=2)
    one = caches.ephemeral()
    one.store_kv("backbone", (1, 2), _kv(2))
    assert caches.ephemeral().lookup("backbone", (1, 2)) == ((), 0) and len(caches) == 0
