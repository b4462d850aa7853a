"""Running evaluation episodes: concurrently, resumably.

* :class:`EpisodeLog`: ``episodes.jsonl`` in the run directory. Each finished episode's rows are
  appended (and flushed) as soon as it ends; every row carries ``episode_rows``, the number of rows
  of its episode, so an episode cut off mid-write (the run was killed) counts as not done. A rerun
  keeps the complete episodes, rewrites the file without the incomplete ones, and skips them.
* :class:`SharedScorer`: one scorer used by episodes running on several threads: calls are
  serialised by a lock, and each episode's proxy counts only its own work (beam search and
  Best-of-N read counter deltas).
* :func:`run_jobs`: runs ``job -> rows`` over a thread pool (``concurrency``), in submission order
  when ``concurrency == 1``; every thread builds its own environments (they are not thread-safe).

Determinism: an episode's result is a function of its seeds (env, policy, tie-break) and the scorer,
never of the thread that ran it or of the order episodes finished in; rows are sorted by job
before summarising. An LLM judge that samples (``judge_temperature`` > 0, or several ``judge_samples``) seeds each
request by its prompt (:meth:`agentrm.policies.chat.ChatClient.chat`'s ``key``), not by the order requests reach
it, so concurrency and resume do not change its scores either.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from agentrm.scoring import Scorer, ScoringCounters, score_many


class EpisodeLog:
    """Append-only per-episode rows with resumption (see module doc).

    Args:
        path: the ``episodes.jsonl`` file.
        key: the episode key of a row (e.g. ``(env_set, env, episode)``).
        resume: keep complete episodes already in ``path`` (``False``: start the file anew).
    """

    def __init__(self, path: Path, key: Callable[[dict], Hashable], resume: bool = True):
        self.path = Path(path)
        self.key = key
        self._lock = threading.Lock()
        self.rows: dict[Hashable, list[dict]] = {}
        if resume and self.path.exists():
            groups: dict[Hashable, list[dict]] = {}
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the run was killed
                groups.setdefault(key(row), []).append(row)
            self.rows = {k: g for k, g in groups.items() if len(g) == g[0].get("episode_rows")}
        with open(self.path, "w", encoding="utf-8") as f:  # only complete episodes stay
            for group in self.rows.values():
                f.writelines(json.dumps(r) + "\n" for r in group)

    def done(self, key: Hashable) -> bool:
        return key in self.rows

    def append(self, rows: list[dict]) -> None:
        """Write one finished episode's rows (all of the same key) and flush."""
        if not rows:
            return
        for r in rows:
            r["episode_rows"] = len(rows)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            self.rows[self.key(rows[0])] = rows


class SharedScorer:
    """A per-episode view of a scorer shared by threads: calls under ``lock``, counters of this episode only."""

    def __init__(self, scorer: Scorer, lock: threading.Lock):
        self.scorer, self.lock = scorer, lock
        self.counters = ScoringCounters()

    @property
    def outcome_blind(self) -> bool:
        """The wrapped scorer's declared blindness (a wrapper never changes what its scorer may see)."""
        return self.scorer.outcome_blind

    def _call(self, fn, *args):
        with self.lock:
            before = self.scorer.counters.as_dict()
            out = fn(*args)
            after = self.scorer.counters.as_dict()
        for k, v in after.items():
            if hasattr(self.counters, k):
                setattr(self.counters, k, getattr(self.counters, k) + v - before.get(k, 0))
        return out

    def score_candidates(self, prefix, candidates):
        return self._call(self.scorer.score_candidates, prefix, candidates)

    def score_candidates_many(self, requests):
        return self._call(lambda r: score_many(self.scorer, r), requests)

    def score_trajectories(self, trajs):
        return self._call(self.scorer.score_trajectories, trajs)


def run_jobs(
    jobs: Sequence[Any], run: Callable[[Any], list[dict]], log: EpisodeLog, concurrency: int = 1,
    on_done: Callable[[], None] | None = None,
) -> None:
    """``log.append(run(job))`` for every job, ``concurrency`` at a time; re-raises the first error."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1; got {concurrency}")
    if concurrency == 1:
        for job in jobs:
            log.append(run(job))
            if on_done:
                on_done()
        return
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        try:
            for fut in as_completed(futures):
                log.append(fut.result())
                if on_done:
                    on_done()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
