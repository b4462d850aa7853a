"""The remote scorer: a reward model served by ``python -m agentrm.serve``, used like a local one.

:class:`RemoteScorer` implements the :class:`~agentrm.scoring.Scorer` protocol over HTTP (``httpx``, through
:func:`agentrm.policies.endpoint.post_json`: per-attempt timeouts, retries with backoff or the server's
``Retry-After`` within a total deadline, one line when the server is gone). Scoring is idempotent, so every
call may be retried; a server restarted mid-run answers the retry (its prefix caches are gone: the next
calls forward a little more, the scores are the same).

* ``score_candidates_many`` sends every prefix of a beam-search depth in one request (split only where the
  server's ``max_items`` / ``max_candidates`` require), with this scorer's session key, so the server keeps
  the session's prefix KV cache across depths as an in-process scorer keeps its own.
* Outcome-blindness is declared here, from the spec (``outcome_blind``): the search layer withholds before
  anything is sent (:mod:`agentrm.search.blind`), and a withheld step travels as ``{"action", "withheld":
  true}`` with no reply, so the server's model reads exactly what an in-process scorer's would.
* ``counters`` add up the server's work for this scorer's requests (``forward_tokens`` etc., as reported in
  each reply's ``usage``) and ``server_wait_ms``, the time spent waiting for the server's answers.

Scores are float32 tensors on the CPU, as the in-process scorers return them (the server's float32 values
travel as JSON doubles, which hold them exactly).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import torch
from torch import Tensor

from agentrm.data.schema import Step, Trajectory
from agentrm.policies.endpoint import (
    EndpointError,
    EndpointUnavailable,
    RequestLimits,
    describe_transport_error,
    http_client,
    post_json,
)
from agentrm.scoring.base import ScoringCounters
from agentrm.scoring.tokens import Candidate

USAGE_COUNTERS = ("forward_passes", "forward_tokens", "padded_tokens", "cached_tokens", "cached_calls", "packed_calls",
                  "plain_calls")
LABEL = "remote scorer"


def step_json(step: Step) -> dict[str, Any]:
    """A step as the server reads it (a withheld step carries no reply; values and outcomes are never sent)."""
    if step.withheld:
        return {"action": step.action, "withheld": True}
    return {"action": step.action, "observation": step.observation}


def trajectory_json(traj: Trajectory) -> dict[str, Any]:
    """A trajectory or prefix as the server reads it: id, task, instruction and steps; never reward or success."""
    return {"id": str(traj.id)[:200], "task": str(traj.task)[:200], "instruction": traj.instruction,
            "steps": [step_json(s) for s in traj.steps]}


def candidate_json(c: Candidate) -> str | dict[str, Any]:
    return c if isinstance(c, str) else step_json(c)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _get(url: str, api_key: str | None, timeout_s: float) -> httpx.Response:
    timeout = httpx.Timeout(timeout_s)
    try:
        return http_client().get(url, headers=_headers(api_key), timeout=timeout)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
        raise EndpointError(f"{LABEL}: {url}: not a valid http(s) URL ({' '.join(str(e).split())})") from None
    except httpx.RequestError as e:
        raise EndpointUnavailable(f"{LABEL}: {url} is not reachable: {describe_transport_error(e, timeout)}") from None


def server_info(url: str, api_key: str | None = None, ready_timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait until the server at ``url`` is ready (``GET /health`` 200), then return its ``GET /info`` ``model``.

    Raises:
        EndpointUnavailable: not ready within ``ready_timeout_s`` (one line naming the URL and the last answer).
        EndpointError: a wrong key (401), or an answer that is not an agentrm reward-model server.
    """
    base = url.rstrip("/")
    deadline = time.monotonic() + ready_timeout_s
    while True:
        left = max(0.1, deadline - time.monotonic())
        try:
            r = _get(f"{base}/health", api_key, min(left, 10.0))
        except EndpointUnavailable as e:
            if time.monotonic() >= deadline:
                raise EndpointUnavailable(f"{e} (waited {ready_timeout_s:g} s)") from None
            time.sleep(min(0.5, left))
            continue
        if r.status_code == 401:
            raise EndpointError(f"{LABEL}: {base}: HTTP 401: the API key is missing or wrong (api_key_env)")
        if r.status_code == 200:
            break
        if time.monotonic() >= deadline:
            raise EndpointUnavailable(f"{LABEL}: {base} is not ready after {ready_timeout_s:g} s "
                                      f"(GET /health: HTTP {r.status_code} {' '.join(r.text.split())[:100]})")
        time.sleep(min(0.5, left))
    r = _get(f"{base}/info", api_key, 10.0)
    try:
        model = r.json()["model"]
        model["fingerprint"], model["kind"], model["limits"]  # noqa: B018 (fields every agentrm server reports)
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"{LABEL}: {base}/info is not an agentrm reward-model server's answer "
                            f"(HTTP {r.status_code}: {' '.join(r.text.split())[:120]})") from None
    return model


class RemoteScorer:
    """A :class:`~agentrm.scoring.Scorer` whose model runs behind ``python -m agentrm.serve`` (module doc).

    Args:
        url: the server's base URL (``http://host:port``).
        api_key: the bearer key (from the environment variable the spec names), or ``None``.
        outcome_blind: the declared blindness (the spec's); the search layer withholds accordingly.
        session: the prefix-cache session key (default: a fresh random one per scorer).
        request_deadline_s, connect_timeout, read_timeout, max_retries, max_backoff: bounds of one call,
            retries included; pauses between attempts double from 0.5 s up to ``max_backoff`` (or follow the
            server's ``Retry-After``) (:func:`~agentrm.policies.endpoint.post_json`).
        info: the server's ``/info`` ``model`` (fetched when not given): its limits size the requests.
    """

    def __init__(self, url: str, api_key: str | None = None, outcome_blind: bool = True, session: str | None = None,
                 request_deadline_s: float = 120.0, connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 max_retries: int = 12, max_backoff: float = 5.0, info: dict[str, Any] | None = None):
        self.base = url.rstrip("/")
        self.api_key = api_key
        self.outcome_blind = outcome_blind
        self.session = session or f"agentrm-{uuid.uuid4().hex}"
        self.limits = RequestLimits(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                    deadline_s=request_deadline_s, max_retries=max_retries, max_backoff=max_backoff,
                                    label=LABEL)
        self.info = info if info is not None else server_info(url, api_key, ready_timeout_s=request_deadline_s)
        limits = self.info.get("limits", {})
        self.max_items = int(limits.get("max_items", 64))
        self.max_candidates = int(limits.get("max_candidates", 256))
        self.counters = ScoringCounters()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return post_json(f"{self.base}{path}", body, headers=_headers(self.api_key), limits=self.limits)
        finally:
            if hasattr(self.counters, "server_wait_ms"):
                self.counters.server_wait_ms += round(1000 * (time.perf_counter() - t0))

    def _count(self, usage: dict[str, Any]) -> None:
        for key in USAGE_COUNTERS:
            setattr(self.counters, key, getattr(self.counters, key) + int(usage.get(key, 0)))

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` whole-trajectory scores (the server's scorer: its aggregate, its reading of withheld steps)."""
        out: list[float] = []
        for c0 in range(0, len(trajs), self.max_items):
            chunk = trajs[c0 : c0 + self.max_items]
            reply = self._post("/v1/score/trajectories", {"trajectories": [trajectory_json(t) for t in chunk]})
            self._count(reply.get("usage", {}))
            out.extend(self._floats(reply.get("scores"), len(chunk), "scores"))
        self.counters.trajectories += len(trajs)
        return torch.tensor(out, dtype=torch.float32)

    def score_candidates(self, prefix: Trajectory, candidates: Sequence[Candidate]) -> Tensor:
        """``[K]`` scores of each candidate as the step after ``prefix.steps``."""
        return self.score_candidates_many([(prefix, candidates)])[0]

    def score_candidates_many(self, requests: Sequence[tuple[Trajectory, Sequence[Candidate]]]) -> list[Tensor]:
        """Scores of every prefix's candidates, in as few requests as the server's limits allow."""
        pieces = []  # (request index, candidate offset, candidates): a prefix over max_candidates is split
        for i, (_, cands) in enumerate(requests):
            for c0 in range(0, len(cands), self.max_candidates):
                pieces.append((i, list(cands[c0 : c0 + self.max_candidates])))
        scores: list[list[float]] = [[] for _ in requests]
        batch: list[tuple[int, list[Candidate]]] = []

        def flush() -> None:
            if not batch:
                return
            body = {"session": self.session, "items": [
                {"prefix": trajectory_json(requests[i][0]), "candidates": [candidate_json(c) for c in cands]}
                for i, cands in batch]}
            reply = self._post("/v1/score/candidates", body)
            self._count(reply.get("usage", {}))
            got = reply.get("scores")
            if not isinstance(got, list) or len(got) != len(batch):
                raise EndpointError(f"{LABEL}: {self.base}: the reply holds {len(got) if isinstance(got, list) else 0} "
                                    f"score lists for {len(batch)} prefixes")
            for (i, cands), s in zip(batch, got):
                scores[i].extend(self._floats(s, len(cands), "scores"))
            self.counters.candidates += sum(len(c) for _, c in batch)
            batch.clear()

        size = 0
        for i, cands in pieces:
            if batch and (len(batch) >= self.max_items or size + len(cands) > self.max_candidates):
                flush()
                size = 0
            batch.append((i, cands))
            size += len(cands)
        flush()
        return [torch.tensor(s, dtype=torch.float32) for s in scores]

    def _floats(self, values: Any, n: int, what: str) -> list[float]:
        if not isinstance(values, list) or len(values) != n or not all(isinstance(v, (int, float)) for v in values):
            raise EndpointError(f"{LABEL}: {self.base}: the reply's {what} are not {n} numbers")
        return [float(v) for v in values]

    def clear_cache(self) -> None:
        """Free this scorer's session on the server (its prefix cache); later calls start a new one."""
        try:
            self._post("/v1/sessions/close", {"session": self.session})
        finally:
            self.session = f"agentrm-{uuid.uuid4().hex}"
