"""HTTP to OpenAI-compatible servers (vLLM, llama.cpp) with bounded waits: timeouts, retries, a deadline, a readiness check.

Used by :class:`~agentrm.policies.openai_compat.OpenAIChatPolicy` (the acting policy and the LLM judge's
client). Every wait is bounded:

* each attempt has a connect timeout and a read/write timeout (``httpx``), both cut to what is left of
  the request's deadline;
* one request, with all its retries and backoff pauses, ends within its total deadline
  (``request_deadline_s``): a server that accepts connections but never answers costs one deadline, then
  :class:`EndpointUnavailable` names the URL, the attempts and the last error in one line;
* while a request waits, one line per ``wait_notice_s`` goes to stderr
  (``openai policy: waiting for http://...: 30 s, attempt 2/4``), so a stall is never silent;
* :func:`check_endpoints_ready` checks every replica once before work starts (``GET /models`` lists the
  model, else a 1-token chat request is answered) and fails in one line naming the URL and what happened.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """The endpoint answered with an error or a malformed body, or not at all (message: one line naming the URL)."""


class EndpointUnavailable(EndpointError):
    """No answer: connection refused, timeouts or retryable HTTP statuses until the attempts or the deadline ran out."""


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def describe_transport_error(e: httpx.RequestError, timeout: httpx.Timeout) -> str:
    """A short cause for a failed attempt: ``cannot connect ([Errno 111] Connection refused)``, ``no answer within 5 s``."""
    if isinstance(e, httpx.ConnectTimeout):
        return f"connect timeout ({timeout.connect:.3g} s)"
    if isinstance(e, httpx.ReadTimeout):
        return f"no answer within {timeout.read:.3g} s (read timeout)"
    if isinstance(e, httpx.WriteTimeout):
        return f"request not sent within {timeout.write:.3g} s (write timeout)"
    if isinstance(e, httpx.PoolTimeout):
        return f"no free connection within {timeout.pool:.3g} s"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({_one_line(str(e)) or 'connection failed'})"
    return f"{type(e).__name__}: {_one_line(str(e)) or 'transport error'}"


# --- one shared HTTP client per process (thread-safe; recreated in a forked child) -------------------------

_CLIENT: httpx.Client | None = None
_CLIENT_LOCK = threading.Lock()


def http_client() -> httpx.Client:
    """The process's shared ``httpx.Client`` (connection pool; timeouts are set per request)."""
    global _CLIENT
    with _CLIENT_LOCK:
        if _CLIENT is None:
            _CLIENT = httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        return _CLIENT


# --- stderr notices for requests that wait long ------------------------------------------------------------


class _Waiting:
    """One request in flight: what its notice line says and when the next one is due."""

    def __init__(self, label: str, url: str, attempts: int, every: float):
        self.label, self.url, self.attempts, self.every = label, url, attempts, every
        self.start = time.monotonic()
        self.attempt = 1
        self.next_notice = self.start + every

    def line(self, now: float) -> str:
        return (f"{self.label}: waiting for {self.url}: {now - self.start:.0f} s, "
                f"attempt {self.attempt}/{self.attempts}")


class _WaitNotices:
    """One daemon thread that prints a line for each request waiting longer than its notice period
    (then at most one per period per request); it sleeps while nothing is due."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waits: set[_Waiting] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, w: _Waiting) -> None:
        with self._lock:
            self._waits.add(w)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="agentrm-wait-notices", daemon=True)
                self._thread.start()
        self._wake.set()

    def remove(self, w: _Waiting) -> None:
        with self._lock:
            self._waits.discard(w)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._waits if now >= w.next_notice]
                for w in due:
                    w.next_notice = now + w.every
                lines = [w.line(now) for w in due]
                nxt = min((w.next_notice for w in self._waits), default=now + 3600.0)
            for line in lines:
                print(line, file=sys.stderr, flush=True)
            self._wake.wait(timeout=min(3600.0, max(0.02, nxt - time.monotonic())))
            self._wake.clear()


_NOTICES = _WaitNotices()


def _after_fork_in_child() -> None:
    global _CLIENT, _CLIENT_LOCK, _NOTICES
    _CLIENT, _CLIENT_LOCK, _NOTICES = None, threading.Lock(), _WaitNotices()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- requests ------------------------------------------------------------------------------------------------


class _PastDeadline(Exception):
    """The answer was still arriving when the request's deadline passed."""


def _timeout(connect: float, read: float, remaining: float) -> httpx.Timeout:
    cut = max(remaining, 0.001)
    return httpx.Timeout(connect=min(connect, cut), read=min(read, cut), write=min(read, cut), pool=min(connect, cut))


def _receive(response: httpx.Response, deadline: float) -> bytes:
    """The body, read chunk by chunk so that a server trickling bytes cannot outlast the deadline."""
    chunks = []
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise _PastDeadline
    return b"".join(chunks)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None


@dataclass(frozen=True)
class RequestLimits:
    """How long one HTTP request may take, retries included (the OpenAI-compatible policy and judge, the remote
    scorer).

    Attributes:
        connect_timeout, read_timeout: per attempt, in seconds (read also bounds the write), each cut to what is
            left of the deadline.
        deadline_s: the whole request (every attempt and pause) ends within this many seconds (plus the time to
            notice it: at most one read of a trickling answer).
        max_retries: retries after the first attempt (connection errors, timeouts, HTTP 408/409/429/5xx).
        backoff, max_backoff: the pause before retry ``i`` is ``backoff * 2**i`` (or the server's ``Retry-After``),
            at most ``max_backoff`` and never past the deadline.
        wait_notice_s: a line on stderr after this many seconds of waiting, then at most one per period
            (``None`` or ``0``: silent).
        label: who waits, in messages (``openai policy``, ``judge``, ``remote scorer``).
    """

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    deadline_s: float = 180.0
    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    wait_notice_s: float | None = 10.0
    label: str = "openai policy"

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds; got {getattr(self, name)}")
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"max_retries, backoff and max_backoff must be >= 0; got {self.max_retries}, "
                             f"{self.backoff}, {self.max_backoff}")


def post_json(url: str, body: dict[str, Any], *, headers: dict[str, str] | None = None,
              limits: RequestLimits | None = None, on_attempt: Callable[[int], None] | None = None,
              ) -> dict[str, Any]:
    """POST ``body`` as JSON to ``url``; return the JSON reply, retrying within a total deadline (``limits``).

    Connection errors, timeouts and HTTP 408/409/429/5xx are retried (at most ``limits.max_retries`` times) after
    ``backoff * 2**attempt`` seconds (or the server's ``Retry-After``), capped at ``max_backoff`` and at the
    time left; other statuses and a body that is not JSON fail at once with :class:`EndpointError`.

    Args:
        on_attempt: called with the attempt's index (0 = first) before each attempt is sent.

    Raises:
        EndpointUnavailable: no answer within the attempts or the deadline; the message is one line
            (``<label>: <url> failed after 3 attempts (2.1 s); last error: cannot connect (...)`` or
            ``<label>: <url> did not answer within 120 s (4 attempts in 118.0 s); last error: ...``; a retry
            that could not start before the deadline is not waited for).
        EndpointError: an HTTP status that is not retried, or a reply that is not JSON.
    """
    data = json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    lim = limits or RequestLimits()
    label = lim.label
    attempts = lim.max_retries + 1
    start = time.monotonic()
    deadline = start + lim.deadline_s
    waiting = _Waiting(label, url, attempts, lim.wait_notice_s) if lim.wait_notice_s else None
    if waiting is not None:
        _NOTICES.add(waiting)
    last, made = "no attempt made", 0
    try:
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if waiting is not None:
                waiting.attempt = attempt + 1
            if on_attempt is not None:
                on_attempt(attempt)
            made += 1
            pause = min(lim.max_backoff, lim.backoff * 2**attempt)
            timeout = _timeout(lim.connect_timeout, lim.read_timeout, remaining)
            try:
                with http_client().stream("POST", url, content=data, headers=hdrs, timeout=timeout) as r:
                    raw = _receive(r, deadline)
                status = r.status_code
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
                raise EndpointError(f"{label}: {url}: not a valid http(s) URL ({_one_line(str(e))})") from None
            except httpx.RequestError as e:
                last = describe_transport_error(e, timeout)
            except _PastDeadline:
                last = "the answer was still arriving at the deadline"
                break
            else:
                if 200 <= status < 300:
                    try:
                        return json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise EndpointError(f"{label}: {url}: response is not JSON ({e.msg}): {raw[:200]!r}") from None
                last = f"HTTP {status}: {_one_line(raw[:300].decode(errors='replace'))}"
                if status not in RETRY_STATUS:
                    raise EndpointError(f"{label}: {url}: {last}")
                pause = min(lim.max_backoff, _retry_after(r) or pause)
            if attempt < attempts - 1:
                if pause >= deadline - time.monotonic():
                    break  # the next attempt could not start before the deadline
                time.sleep(pause)
    finally:
        if waiting is not None:
            _NOTICES.remove(waiting)
    elapsed = time.monotonic() - start
    if made == attempts and elapsed < lim.deadline_s:
        raise EndpointUnavailable(f"{label}: {url} failed after {made} attempts ({elapsed:.1f} s); last error: {last}")
    raise EndpointUnavailable(f"{label}: {url} did not answer within {lim.deadline_s:g} s "
                              f"({made} attempt{'s' * (made != 1)} in {elapsed:.1f} s); last error: {last}")


# --- readiness -----------------------------------------------------------------------------------------------


def _probe_chat(base: str, model: str, headers: dict[str, str], timeout: httpx.Timeout) -> str | None:
    """``None`` if a 1-token chat request for ``model`` is answered with 2xx, else what happened instead."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1, "n": 1,
            "temperature": 0.0}
    try:
        r = http_client().post(f"{base}/chat/completions", json=body, headers=headers, timeout=timeout)
    except httpx.RequestError as e:
        return describe_transport_error(e, timeout)
    if 200 <= r.status_code < 300:
        return None
    return f"HTTP {r.status_code}: {_one_line(r.text, 200)}"


def check_endpoint_ready(base_url: str, model: str, api_key: str | None = None, timeout_s: float = 15.0,
                         label: str = "openai policy") -> None:
    """Check one server: ``GET {base_url}/models`` lists ``model``, or a 1-token chat request for it is answered.

    A server that lists other models but accepts the name (llama.cpp serves its one model under any name)
    passes; one without ``/models`` is checked by the chat request alone.

    Raises:
        EndpointUnavailable: nothing answered (connection refused, no answer within ``timeout_s``,
            5xx/429 statuses); one line naming the URL and what happened.
        EndpointError: the server answered but cannot serve: ``model`` is not served (the served
            ones are listed), or an HTTP error such as 401.
    """
    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(timeout_s)
    try:
        r = http_client().get(f"{base}/models", headers=headers, timeout=timeout)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
        raise EndpointError(f"{label}: {base}: not a valid http(s) URL ({_one_line(str(e))})") from None
    except httpx.RequestError as e:
        cause = describe_transport_error(e, timeout)
        if isinstance(e, httpx.TimeoutException):
            cause = f"no answer to GET {base}/models within {timeout_s:g} s"
        raise EndpointUnavailable(f"{label}: {base} is not reachable: {cause}") from None
    if r.status_code in RETRY_STATUS:
        raise EndpointUnavailable(
            f"{label}: {base} is not ready: GET /models answered HTTP {r.status_code}: {_one_line(r.text, 200)}")
    served: list[str] | None = None
    if r.status_code == 200:
        try:
            served = [str(m.get("id")) for m in r.json().get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            served = None  # not the OpenAI models list: ask the chat endpoint
    elif r.status_code in (401, 403):
        raise EndpointError(f"{label}: {base}: GET /models answered HTTP {r.status_code} (check api_key): "
                            f"{_one_line(r.text, 200)}")
    if served is not None and model in served:
        return
    problem = _probe_chat(base, model, headers, timeout)
    if problem is None:
        return
    if served is not None:
        shown = ", ".join(repr(s) for s in served[:10]) + (f" and {len(served) - 10} more" if len(served) > 10 else "")
        raise EndpointError(f"{label}: {base} does not serve model {model!r} (it serves {shown or 'no model'}); "
                            f"a 1-token request for it got {problem}")
    unavailable = problem.startswith(("HTTP 5", "HTTP 429", "HTTP 408", "cannot connect", "no answer", "connect"))
    cls = EndpointUnavailable if unavailable else EndpointError
    raise cls(f"{label}: {base} has no model list (GET /models: HTTP {r.status_code}) and a 1-token request "
              f"for model {model!r} got {problem}")


def check_endpoints_ready(base_urls: str | Sequence[str], model: str, api_key: str | None = None,
                          timeout_s: float = 15.0, label: str = "openai policy") -> None:
    """:func:`check_endpoint_ready` for every replica at once; all failures in one line (the first one's class)."""
    bases = [base_urls] if isinstance(base_urls, str) else list(base_urls)
    if not bases:
        raise ValueError("base_url: give at least one endpoint")

    def check(base: str) -> EndpointError | None:
        try:
            check_endpoint_ready(base, model, api_key, timeout_s, label)
        except EndpointError as e:
            return e
        return None

    with ThreadPoolExecutor(min(len(bases), 8)) as pool:
        failures = [e for e in pool.map(check, bases) if e is not None]
    if failures:
        msg = str(failures[0]) if len(failures) == 1 else "; ".join(
            [str(failures[0])] + [str(e).removeprefix(f"{label}: ") for e in failures[1:]])
        raise type(failures[0])(msg)
