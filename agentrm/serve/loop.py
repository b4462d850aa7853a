"""LitServe's batched loop, collecting batches without busy-polling the request queue.

LitServe 0.2's ``BatchedLoop`` gathers a batch by polling its (multiprocessing-manager) request queue with
1 ms timeouts for the whole ``batch_timeout`` window, again and again while idle: about a thousand round
trips a second through the manager process, which on a small CPU takes cycles from the model. This loop
keeps LitServe's batching semantics (up to ``max_batch_size`` requests, ``batch_timeout`` seconds of waiting
for more, queue timeouts answered 504) but blocks on the queue: up to 1 s for a first request (then it
checks for shutdown), then for what is left of the window. It is passed to ``LitAPI(loop=...)``, LitServe's
own extension point; everything else (decode, batch, predict, unbatch, encode, responses) is LitServe's.
"""

from __future__ import annotations

import time
from queue import Empty

from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_WAIT_S = 1.0


class BlockingBatchedLoop(BatchedLoop):
    """``BatchedLoop`` whose batch collection blocks instead of polling (see the module doc)."""

    def get_batch_requests(self, lit_api, request_queue, transport) -> tuple[list, list]:
        if getattr(self, "_stopping", False):  # a stop signal came behind requests that were answered first
            raise _StopLoopError()
        try:
            first = request_queue.get(timeout=IDLE_WAIT_S)
        except Empty:
            return [], []
        items = [first]
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(items) < lit_api.max_batch_size and items[-1] != _SENTINEL_VALUE:
            remaining = deadline - time.monotonic()
            try:  # past the window: only what is already queued
                items.append(request_queue.get(timeout=remaining) if remaining > 0 else request_queue.get_nowait())
            except Empty:
                break
        payloads, timed_out = [], []
        apply_timeout = lit_api.request_timeout not in (-1, False, None)
        for item in items:
            if item == _SENTINEL_VALUE:
                if len(items) == 1:
                    raise _StopLoopError()
                self._stopping = True  # answer the requests collected before it, then stop
                continue
            response_queue_id, uid, timestamp, x_enc = item
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR)
            if apply_timeout and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, x_enc))
        return payloads, timed_out
