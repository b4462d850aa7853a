"""The inference worker: a LitServe ``LitAPI`` that scores batches of requests with one RM scorer.

LitServe's batching loop hands :meth:`RewardModelAPI.predict` up to ``max_batch_size`` requests that arrived
within ``batch_timeout`` of each other (from any number of clients). They are scored in shared forwards:

* every trajectory request of the batch in one ``scorer.score_trajectories`` call (``batch_size`` per forward);
* candidate requests grouped by session: each group in one ``scorer.score_candidates_many`` call against that
  session's prefix cache (:mod:`agentrm.serve.sessions`), so the prefixes of many requests share the cached
  path's forwards; the requests without a session form one group with a fresh cache.

A request whose group fails is retried alone, so one bad request (a candidate longer than the context, a
bare action for the value RM) is answered with its own one-line error and never fails the others. Work
counters (``usage``) are the scorer's counters over the group's call, split between the group's requests by
their share of candidates or trajectories when several shared it.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import litserve as ls
import torch

from agentrm.cli_errors import one_line
from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Trajectory
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.search.build import build_scorer
from agentrm.search.resolve import ResolvedScorer
from agentrm.serve.sessions import SessionCaches

log = logging.getLogger("agentrm.serve")

USAGE_KEYS = ("forward_passes", "forward_tokens", "padded_tokens", "cached_tokens", "cached_calls", "packed_calls",
              "plain_calls")
Result = dict[str, Any]
"""``{"status": 200, "body": {...}}`` or ``{"status": 4xx/5xx, "detail": "<one line>"}``."""


def _error(e: BaseException) -> Result:
    if isinstance(e, ValueError):  # the request cannot be scored as given (the message says why)
        return {"status": 422, "detail": one_line(e)}
    log.exception("scoring failed")
    return {"status": 500, "detail": f"internal error while scoring: {type(e).__name__}: {one_line(e)}"}


def _split_usage(delta: dict[str, int], shares: Sequence[int], ms: float) -> list[dict[str, Any]]:
    """``delta`` split by ``shares`` (largest remainder, so the parts add up to the whole)."""
    total = sum(shares) or 1
    out: list[dict[str, Any]] = [{"compute_ms": round(ms, 3), "batched_requests": len(shares)} for _ in shares]
    for key in USAGE_KEYS:
        exact = [delta.get(key, 0) * s / total for s in shares]
        parts = [math.floor(x) for x in exact]
        for i in sorted(range(len(shares)), key=lambda i: parts[i] - exact[i])[: delta.get(key, 0) - sum(parts)]:
            parts[i] += 1
        for u, p in zip(out, parts):
            u[key] = p
    return out


class RewardModelAPI(ls.LitAPI):
    """Scores what the HTTP side (:class:`~agentrm.serve.spec.RewardModelSpec`) queued: validated requests
    ``{"op": "trajectories" | "candidates" | "close", ...}`` holding :class:`~agentrm.data.schema.Trajectory`
    objects (never files or names: the model is fixed at startup).

    Args:
        resolved: the served scorer, resolved in the main process (built in :meth:`setup`, in the worker).
        session: ``(entries, session_bytes, total_bytes, max_sessions)`` of :class:`SessionCaches`.
        num_threads: torch CPU threads in the worker (``None``: torch's default).
        authorize: the bearer-token check (a FastAPI dependency, run by LitServe on every route).
        spec, max_batch_size, batch_timeout: LitServe's.
    """

    def __init__(self, resolved: ResolvedScorer, session: tuple[int, int, int, int], num_threads: int | None,
                 authorize: Callable | None, spec: ls.specs.LitSpec, max_batch_size: int, batch_timeout: float):
        from agentrm.serve.loop import BlockingBatchedLoop

        loop = BlockingBatchedLoop() if max_batch_size > 1 else "auto"  # unbatched: LitServe's (blocking) loop
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec, loop=loop)
        self.resolved, self.session_bounds, self.num_threads = resolved, session, num_threads
        if authorize is not None:
            self.authorize = authorize  # LitServe runs LitAPI.authorize as a dependency of every route

    def setup(self, device) -> None:
        # a terminal's Ctrl+C reaches the whole process group: the worker ignores it and is stopped by the main
        # process only after the HTTP side has finished its in-flight requests (graceful shutdown)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.scorer = build_scorer(self.resolved)
        self.sessions = SessionCaches(*self.session_bounds, counters=self.scorer.counters)

    def health(self) -> bool:
        return True

    # LitServe calls these around predict; requests arrive decoded and are answered as plain dicts
    def decode_request(self, request, **kwargs):
        return request

    def encode_response(self, output, **kwargs):
        return output

    def batch(self, inputs):
        return list(inputs)

    def unbatch(self, output):
        return list(output)

    def predict(self, x, **kwargs):
        if self.max_batch_size == 1:  # LitServe's unbatched loop passes one request
            return self.score_batch([x])[0]
        return self.score_batch(x)

    # -- scoring ---------------------------------------------------------------------------------------------
    def score_batch(self, requests: Sequence[dict[str, Any]]) -> list[Result]:
        """One result per request (same order); see the module doc for the grouping."""
        out: list[Result | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            if r["op"] == "close":
                out[i] = {"status": 200, "body": {"session": r["session"], "closed": self.sessions.close(r["session"])}}
        trajs = [i for i, r in enumerate(requests) if r["op"] == "trajectories"]
        if trajs:
            self._grouped(trajs, requests, out, self._trajectories)
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            if r["op"] == "candidates":
                groups.setdefault(r.get("session"), []).append(i)
        for idx in groups.values():
            self._grouped(idx, requests, out, self._candidates)
        self.sessions.enforce()
        return out  # type: ignore[return-value]

    def _grouped(self, idx: list[int], requests, out: list, fn) -> None:
        """``fn`` on the requests ``idx`` together; if that fails, on each alone (errors stay per request)."""
        try:
            for i, res in zip(idx, fn([requests[i] for i in idx])):
                out[i] = res
        except Exception as e:  # answered per request below
            if len(idx) == 1:
                out[idx[0]] = _error(e)
                return
            for i in idx:
                self._grouped([i], requests, out, fn)

    def _delta(self, before: dict[str, int]) -> dict[str, int]:
        after = self.scorer.counters.as_dict()
        return {k: after[k] - before.get(k, 0) for k in USAGE_KEYS}

    def _trajectories(self, reqs: list[dict[str, Any]]) -> list[Result]:
        flat = [t for r in reqs for t in r["trajectories"]]
        before, t0 = self.scorer.counters.as_dict(), time.perf_counter()
        scores = self.scorer.score_trajectories(flat).tolist()
        steps = step_scores(self.scorer, flat) if any(r["return_steps"] for r in reqs) else None
        usage = _split_usage(self._delta(before), [len(r["trajectories"]) for r in reqs],
                             1000 * (time.perf_counter() - t0))
        out, j = [], 0
        for r, u in zip(reqs, usage):
            n = len(r["trajectories"])
            body = {"scores": scores[j : j + n], "usage": {"trajectories": n, **u}}
            if r["return_steps"]:
                body["step_scores"] = steps[j : j + n]
            out.append({"status": 200, "body": body})
            j += n
        return out

    def _candidates(self, reqs: list[dict[str, Any]]) -> list[Result]:
        session = reqs[0].get("session")
        self.scorer.prefix_cache = self.sessions.get(session) if session else self.sessions.ephemeral()
        flat = [pair for r in reqs for pair in r["items"]]
        before, t0 = self.scorer.counters.as_dict(), time.perf_counter()
        try:
            scores = self.scorer.score_candidates_many(flat)
        finally:
            self.scorer.prefix_cache = self.sessions.ephemeral()  # nothing of a session stays attached
        sizes = [sum(len(c) for _, c in r["items"]) for r in reqs]
        usage = _split_usage(self._delta(before), sizes, 1000 * (time.perf_counter() - t0))
        out, j = [], 0
        for r, u, size in zip(reqs, usage, sizes):
            n = len(r["items"])
            body = {"scores": [s.tolist() for s in scores[j : j + n]], "usage": {"candidates": size, **u}}
            out.append({"status": 200, "body": body})
            j += n
        return out


@torch.no_grad()
def step_scores(scorer, trajs: Sequence[Trajectory]) -> list[list[float | None]]:
    """Per-step values (value RM) or rewards (implicit PRM) of each trajectory, aligned with its steps.

    ``None`` marks a step the model did not read: one dropped by truncation (the oldest steps go first,
    :func:`~agentrm.data.tokenize.tokenize_trajectory`) or, for the value RM, a trailing withheld step (it has
    no observation to read a value at; the aggregate reads it as the state before it).
    """
    model, value_rm = scorer.model, hasattr(scorer.model, "value_head")
    out: list[list[float | None]] = []
    for c0 in range(0, len(trajs), scorer.batch_size):
        chunk = list(trajs[c0 : c0 + scorer.batch_size])
        shown = []
        for t in chunk:
            drop = 1 if value_rm and t.steps and t.steps[-1].withheld else 0
            shown.append(Trajectory(t.id, t.task, t.instruction, t.steps[: len(t.steps) - drop], 0.0, False))
        items = [tokenize_trajectory(scorer.tokenizer, t, scorer.max_length) for t in shown]
        nonempty = [i for i, it in enumerate(items) if it.step_end_idx]
        vals: dict[int, list[float]] = {}
        if nonempty:
            batch = collate_trajectories([items[i] for i in nonempty], scorer._pad_id())
            batch = {k: v.to(scorer._device()) for k, v in batch.items()}
            per = model.score(batch).float().cpu()
            for row, i in enumerate(nonempty):
                vals[i] = per[row, : len(items[i].step_end_idx)].tolist()
        for i, (t, it) in enumerate(zip(chunk, items)):
            got = vals.get(i, [])
            row: list[float | None] = [None] * len(t.steps)
            for s, v in enumerate(got):
                row[it.first_step + s] = v
            out.append(row)
    return out
