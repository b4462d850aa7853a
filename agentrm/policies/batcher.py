"""Dynamic batching of ``generate`` calls from several threads (episodes run concurrently) on one model.

The evaluation harness runs ``concurrency`` episodes on threads, each with its own
:class:`~agentrm.policies.hf.HFPolicy` (its own seed) over one shared model. With a shared
:class:`GenerateBatcher` their replies are generated together: the first thread to arrive waits
``window_s`` for the others (only when another thread submitted in the last second, so a single
caller never waits), then generates every pending row in left-padded batches of
``max_rows`` (rows grouped by sampling settings), and hands each thread its replies; threads that
arrive meanwhile form the next batch. Each reply is drawn from its own seeded stream
(:mod:`agentrm.policies.sampling`), so which replies share a batch does not choose the samples; only
fp rounding of a differently shaped batch can, at a sampling boundary (rare in fp32; more likely in
bf16 on a GPU, as in any server that batches dynamically).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Rows = list[tuple[int, list[int], int]]  # (prompt index, prompt ids, reply seed)


class GenerateBatcher:
    """Gathers ``generate`` rows from concurrent callers and runs them together.

    Args:
        max_rows: rows per ``generate`` call.
        window_s: how long the first caller waits for others to join its batch.

    Attributes:
        calls / rows: ``generate`` calls made and rows generated (``rows / calls`` is the mean batch).
    """

    def __init__(self, max_rows: int = 32, window_s: float = 0.005):
        if max_rows < 1 or window_s < 0:
            raise ValueError(f"need max_rows >= 1 and window_s >= 0; got {max_rows}, {window_s}")
        self.max_rows, self.window_s = max_rows, window_s
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._busy = False
        self._seen: dict[int, float] = {}  # thread id -> when it last submitted
        self.calls = 0
        self.rows = 0

    def run(self, key: Any, rows: Rows, generate: Callable[[Rows], tuple[list[str], list[int]]]) -> tuple[list[str], list[int]]:
        """``generate(rows)``, batched with the rows other threads submit under the same ``key``.

        ``generate(rows) -> (texts, new_token_counts)`` runs one ``generate`` call; the calls of one
        ``key`` (model and sampling settings) are interchangeable.
        """
        item: dict[str, Any] = {"key": key, "rows": rows, "generate": generate, "done": threading.Event()}
        me, now = threading.get_ident(), time.monotonic()
        with self._lock:
            self._pending.append(item)
            self._seen[me] = now
            others = any(t != me and now - last < 1.0 for t, last in self._seen.items())
        while not item["done"].is_set():
            with self._lock:
                lead = not self._busy
                self._busy = self._busy or lead
            if not lead:
                item["done"].wait(0.01)
                continue
            try:
                if others:
                    time.sleep(self.window_s)  # let the other threads' requests join
                with self._lock:
                    batch, self._pending = self._pending, []
                try:
                    self._run(batch)
                except BaseException as e:  # no caller of this batch may wait forever
                    for it in batch:
                        if not it["done"].is_set():
                            it["error"] = e
                            it["done"].set()
            finally:
                with self._lock:
                    self._busy = False
        if "error" in item:
            raise item["error"]
        return item["out"]

    def _run(self, batch: list[dict[str, Any]]) -> None:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for it in batch:
            groups.setdefault(it["key"], []).append(it)
        for items in groups.values():
            flat = [(it, r) for it in items for r in it["rows"]]
            texts: list[str] = []
            counts: list[int] = []
            try:
                for r0 in range(0, len(flat), self.max_rows):
                    chunk = flat[r0 : r0 + self.max_rows]
                    t, c = items[0]["generate"]([r for _, r in chunk])
                    texts += t
                    counts += c
                    self.calls += 1
                    self.rows += len(chunk)
            except BaseException as e:  # every waiting thread gets the error
                for it in items:
                    it["error"] = e
                    it["done"].set()
                continue
            i = 0
            for it in items:
                n = len(it["rows"])
                it["out"] = (texts[i : i + n], counts[i : i + n])
                i += n
                it["done"].set()
