"""OpenAIChatPolicy against a tiny local chat-completions server: n samples, retries/backoff, down server."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentrm.policies.base import start_history
from agentrm.policies.openai_compat import EndpointError, OpenAIChatPolicy


class _Server:
    """Serves POST /v1/chat/completions; ``fail_first`` requests answer ``fail_status``."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, max_n: int | None = None):
        self.requests: list[dict] = []
        self.fail_first, self.fail_status, self.max_n = fail_first, fail_status, max_n
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if len(outer.requests) <= outer.fail_first:
                    return self._send(outer.fail_status, {"error": "busy"})
                n = body.get("n", 1) if outer.max_n is None else min(outer.max_n, body.get("n", 1))
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": f"Thought: go.\nAction: move forward{i}"},
                    }
                    for i in range(n)
                ]
                self._send(
                    200, {"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n}}
                )

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _history():
    return start_history("babyai/GoToRedBall", "Mission: go to the red ball.\nFacing east.")


def test_propose_sends_chat_and_parses_n_actions():
    with _Server() as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", api_key="sk-x", temperature=0.7, max_tokens=16, seed=5)
        acts = pol.propose(None, _history(), k=3)
    assert acts == ["move forward0", "move forward1", "move forward2"]
    req = srv.requests[0]
    assert req["n"] == 3 and req["model"] == "tiny" and req["temperature"] == 0.7 and req["max_tokens"] == 16
    assert req["messages"] == _history().to_messages() and req["auth"] == "Bearer sk-x"
    assert pol.usage["prompt_tokens"] == 7 and pol.usage["completion_tokens"] == 9


def test_server_ignoring_n_is_asked_again():
    with _Server(max_n=1) as srv:
        replies = OpenAIChatPolicy(srv.url, "tiny").chat([{"role": "user", "content": "hi"}], n=3)
    assert len(replies) == 3 and [r["n"] for r in srv.requests] == [3, 2, 1]


@pytest.mark.parametrize("status", [503, 429])
def test_retries_with_backoff_then_succeeds(status, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("agentrm.policies.openai_compat.time.sleep", sleeps.append)
    with _Server(fail_first=2, fail_status=status) as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", max_retries=3, backoff=0.1)
        assert pol.propose(None, _history(), k=1) == ["move forward0"]
    assert len(srv.requests) == 3 and pol.usage["retries"] == 2
    assert sleeps == pytest.approx([0.1, 0.2])


def test_client_error_fails_fast():
    with _Server(fail_first=5, fail_status=400) as srv:
        with pytest.raises(EndpointError, match="HTTP 400"):
            OpenAIChatPolicy(srv.url, "tiny", max_retries=3, backoff=0.0).chat(
                [{"role": "user", "content": "x"}]
            )
    assert len(srv.requests) == 1


def test_down_server_error_names_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    pol = OpenAIChatPolicy(url, "tiny", max_retries=2, backoff=0.001, timeout=2)
    with pytest.raises(EndpointError) as err:
        pol.propose(None, _history(), k=2)
    assert f"{url}/chat/completions" in str(err.value) and "after 3 attempts" in str(err.value)
    assert pol.usage["requests"] == 3
