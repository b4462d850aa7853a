"""Graceful shutdown of a real server: SIGTERM while a request is in flight; the request is answered, the
process tree ends with exit code 0, and nothing listens afterwards."""

from __future__ import annotations

import threading
import time

import httpx

from tests.serve.server_proc import ServerProcess

BODY = {"trajectories": [{"instruction": "Go to the red ball.",
                          "steps": [{"action": "move forward", "observation": "A red ball ahead."}]}]}


def test_sigterm_finishes_the_request_in_flight(tiny_models, tmp_path):
    # a 3 s batching window keeps the request in flight when the signal arrives
    server = ServerProcess(tiny_models["value_rm"], ["--batch_timeout", "3", "--max_batch_size", "64"],
                           log=tmp_path / "server.log").start()
    replies: list[httpx.Response] = []
    t = threading.Thread(target=lambda: replies.append(
        httpx.post(server.url + "/v1/score/trajectories", json=BODY, headers=server.headers, timeout=60)))
    t0 = time.monotonic()
    t.start()
    time.sleep(1.0)
    code = server.stop(timeout=60)
    t.join(timeout=60)
    assert replies and replies[0].status_code == 200, (replies, server.log.read_text()[-2000:])
    assert len(replies[0].json()["scores"]) == 1
    assert time.monotonic() - t0 >= 2.5  # answered after its batching window, not cut short
    assert code == 0, server.log.read_text()[-2000:]
    assert "Traceback" not in server.log.read_text()
    try:
        httpx.get(server.url + "/health", timeout=2)
        listening = True
    except httpx.HTTPError:
        listening = False
    assert not listening
