"""GenerateBatcher: rows from concurrent threads generated together, by key, results to their callers."""

from __future__ import annotations

import threading

import pytest

from agentrm.policies.batcher import GenerateBatcher


def test_threads_share_calls_by_key_and_get_their_own_rows():
    b = GenerateBatcher(max_rows=4, window_s=0.05)
    calls = []

    def gen(tag):
        def run(rows):
            calls.append((tag, len(rows)))
            return [f"{tag}:{seed}" for _, _, seed in rows], [1] * len(rows)
        return run

    out = {}
    start = threading.Barrier(6)

    def worker(i):
        start.wait()
        key = "a" if i % 2 else "b"
        out[i] = b.run(key, [(0, [1, 2], 10 * i + j) for j in range(i % 3 + 1)], gen(key))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for i in range(6):
        key = "a" if i % 2 else "b"
        assert out[i][0] == [f"{key}:{10 * i + j}" for j in range(i % 3 + 1)]  # own rows, in order
    assert all(n <= 4 for _, n in calls)  # max_rows per call
    assert b.rows == sum(i % 3 + 1 for i in range(6)) and b.calls < 6  # fewer calls than callers


def test_a_failing_generate_reaches_every_waiting_caller():
    b = GenerateBatcher(max_rows=8, window_s=0.05)
    errors = []
    start = threading.Barrier(3)

    def boom(rows):
        raise RuntimeError("out of memory")

    def worker():
        start.wait()
        try:
            b.run("k", [(0, [1], 1)], boom)
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == ["out of memory"] * 3
    single = GenerateBatcher()
    assert single.run("k", [(0, [1], 7)], lambda rows: (["x"], [3])) == (["x"], [3])  # alone: no waiting
    with pytest.raises(ValueError):
        GenerateBatcher(max_rows=0)
