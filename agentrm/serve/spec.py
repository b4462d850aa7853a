"""The HTTP side: a LitServe ``LitSpec`` whose endpoints validate requests, enforce the limits and queue them.

Endpoints (all ``POST``, JSON in and out; schemas in :mod:`agentrm.serve.schema` and ``docs/serving.md``):

* ``/v1/score/trajectories``: whole trajectories -> aggregate scores (and per-step scores on request);
* ``/v1/score/candidates``: prefixes with candidate next steps -> one score per candidate;
* ``/v1/sessions/close``: free a session's prefix cache.

Each request is checked here, in the HTTP process, before it reaches the model: body size
(``max_request_bytes``, 413), JSON and field types (400/422, the first bad field named), items, candidates and
tokens per sequence (422). A request over ``max_queue`` requests in flight is answered at once with 503 and
``Retry-After`` (memory does not grow with the load). Only valid requests reach the worker, so a bad one can
never fail the batch it would have shared. Errors are ``{"detail": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from agentrm.serve.schema import (
    CandidatesRequest,
    CloseSessionRequest,
    Limits,
    RequestError,
    TokenCounter,
    TrajectoriesRequest,
    check_limits,
    parse_body,
)

if TYPE_CHECKING:
    from litserve import LitServer

RETRY_AFTER_S = 1


def _refusal(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes (header, then while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"<body>: {int(declared)} bytes > max_request_bytes={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"<body>: more than max_request_bytes={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class RewardModelSpec(LitSpec):
    """The reward model's routes (see the module doc).

    Args:
        limits: what one request may hold and how many may be in flight.
        request_timeout: seconds a request may wait in the queue (LitServe's ``timeout``; then 504).
        tokenizer_path: the served model's tokenizer (loaded in :meth:`setup`, for the token limit).
    """

    def __init__(self, limits: Limits, tokenizer_path: str, request_timeout: float):
        super().__init__()
        self.limits, self.tokenizer_path, self.request_timeout = limits, tokenizer_path, request_timeout
        self.api_path = "/v1/score"
        self._counter: TokenCounter | None = None
        self._in_flight = 0
        self.add_endpoint("/v1/score/trajectories", self.trajectories, ["POST"])
        self.add_endpoint("/v1/score/candidates", self.candidates, ["POST"])
        self.add_endpoint("/v1/sessions/close", self.close_session, ["POST"])

    def __getstate__(self):
        state = super().__getstate__()
        state["_counter"] = None  # the worker has its own tokenizer; the HTTP side's is not shipped to it
        return state

    def setup(self, server: LitServer) -> None:
        super().setup(server)
        from agentrm.paths import load_tokenizer

        self._counter = TokenCounter(load_tokenizer(self.tokenizer_path), self.limits.max_sequence_tokens)

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # -- routes ----------------------------------------------------------------------------------------------
    async def trajectories(self, request: Request) -> JSONResponse:
        return await self._handle(request, TrajectoriesRequest, lambda r: {
            "op": "trajectories", "trajectories": [t.to_trajectory() for t in r.trajectories],
            "return_steps": r.return_steps})

    async def candidates(self, request: Request) -> JSONResponse:
        return await self._handle(request, CandidatesRequest, lambda r: {
            "op": "candidates", "session": r.session,
            "items": [(it.prefix.to_trajectory(), [c if isinstance(c, str) else c.to_step() for c in it.candidates])
                      for it in r.items]})

    async def close_session(self, request: Request) -> JSONResponse:
        return await self._handle(request, CloseSessionRequest, lambda r: {"op": "close", "session": r.session})

    async def _handle(self, request: Request, model, to_payload) -> JSONResponse:
        if self._in_flight >= self.limits.max_queue:
            return _refusal(503, f"server busy: {self._in_flight} requests in flight (max_queue="
                                 f"{self.limits.max_queue}); retry after {RETRY_AFTER_S} s",
                            {"Retry-After": str(RETRY_AFTER_S)})
        self._in_flight += 1
        try:
            try:
                req = parse_body(await read_body(request, self.limits.max_request_bytes), model)
                check_limits(req, self.limits, self._counter or TokenCounter(None, self.limits.max_sequence_tokens))
            except RequestError as e:
                return _refusal(e.status, e.detail)
            return await self._submit(to_payload(req))
        finally:
            self._in_flight -= 1

    async def _submit(self, payload: dict[str, Any]) -> JSONResponse:
        """Queue ``payload`` for the worker and wait for its answer (LitServe's request/response buffers)."""
        uid = str(uuid.uuid4())
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.request_queue.put_nowait((self.response_queue_id, uid, time.monotonic(), payload))
        try:
            await event.wait()
        finally:
            item = self.response_buffer.pop(uid, None)
        response, status = item.response
        if status == LitAPIStatus.ERROR:  # from LitServe's loop (a queue timeout) or a worker that died
            if isinstance(response, bytes):
                try:
                    response = pickle.loads(response)  # LitServe ships the worker's exception pickled
                except Exception:  # a worker that died sends nothing readable
                    response = None
            code = getattr(response, "status_code", 500)
            if code == 504:
                return _refusal(504, f"the request waited in the queue longer than request_timeout="
                                     f"{self.request_timeout:g} s")
            detail = getattr(response, "detail", None) or "the worker failed while scoring this request"
            return _refusal(code if isinstance(code, int) else 500, " ".join(str(detail).split()))
        if response["status"] != 200:
            return _refusal(response["status"], response["detail"])
        return JSONResponse(response["body"])
