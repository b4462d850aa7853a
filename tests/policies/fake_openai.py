"""Fake OpenAI-compatible servers on real local sockets, for the client's tests and the fault-injection cases.

* :class:`ChatServer`: ``GET /v1/models`` and ``POST /v1/chat/completions`` (options: the models it lists,
  the names it accepts, first requests failing with a status, a server that ignores ``n``, a chat that hangs);
* :class:`HungServer`: accepts TCP connections and never answers;
* :class:`TrickleServer`: answers 200 and then sends its body one byte at a time, forever;
* :func:`closed_port_url`: a URL on a port where nothing listens.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """Serves ``/v1/models`` and ``/v1/chat/completions`` on 127.0.0.1 (a context manager).

    Args:
        fail_first: the first this many chat requests answer ``fail_status``.
        max_n: the most choices per reply (``1``: a server that ignores ``n``).
        models: what ``GET /v1/models`` lists (``None``: 404, a server without a model list).
        accept: model names the chat endpoint serves (others: 404 as vLLM does); ``None``: any name.
        reply: the assistant's content (``{i}`` = the choice's index), or a function of the request's body and the
            choice's index that returns it.
        hang_chat: chat requests are never answered (the model list still is).
    """

    def __init__(self, fail_first: int = 0, fail_status: int = 503, max_n: int | None = None,
                 models: list[str] | None = None, accept: set[str] | None = None,
                 reply: str | Callable[[dict, int], str] = "Thought: go.\nAction: move forward{i}",
                 hang_chat: bool = False,
                 retry_after: str | None = None):
        self.requests: list[dict] = []
        self.gets: list[str] = []
        self.fail_first, self.fail_status, self.max_n = fail_first, fail_status, max_n
        self.models, self.accept, self.reply, self.hang_chat = models, accept, reply, hang_chat
        self.retry_after = retry_after
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.gets.append(self.path)
                if self.path != "/v1/models" or outer.models is None:
                    return self._send(404, {"error": "not found"})
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if outer.hang_chat:
                    outer._stop.wait()
                    return None
                if len(outer.requests) <= outer.fail_first:
                    headers = {"Retry-After": outer.retry_after} if outer.retry_after else {}
                    return self._send(outer.fail_status, {"error": "busy"}, headers)
                if outer.accept is not None and body.get("model") not in outer.accept:
                    return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                n = body.get("n", 1) if outer.max_n is None else min(outer.max_n, body.get("n", 1))
                content = outer.reply if callable(outer.reply) else lambda _, i: outer.reply.format(i=i)
                choices = [{"index": i, "message": {"role": "assistant", "content": content(body, i)}}
                           for i in range(n)]
                self._send(200, {"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n}})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _SocketServer:
    """A listening socket on 127.0.0.1 whose accepted connections go to :meth:`serve` (one thread each)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        for c in self.conns:
            c.close()


class HungServer(_SocketServer):
    """Accepts every connection and never reads or answers (held open until the server closes)."""

    def serve(self, conn: socket.socket) -> None:
        self.stop.wait()

    @property
    def connections(self) -> int:
        return len(self.conns)


class TrickleServer(_SocketServer):
    """Answers ``200`` with a long body and sends it one byte every ``every`` seconds, never finishing."""

    def __init__(self, every: float = 0.05):
        super().__init__()
        self.every = every

    def serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(1.0)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
            while not self.stop.wait(self.every):
                conn.sendall(b" ")
        except OSError:
            return


def closed_port_url() -> str:
    """``http://127.0.0.1:<port>/v1`` where nothing listens (the port was just released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"
