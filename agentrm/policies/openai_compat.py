"""A policy backed by an OpenAI-compatible chat-completions endpoint (e.g. a vLLM or llama.cpp server).

The server must implement ``POST {base_url}/chat/completions``; ``n`` is used where the server
honours it (vLLM does; llama.cpp's Python server returns one choice, and the rest are requested)::

    vllm serve meta-llama/Llama-3.1-8B-Instruct --port 8000
    policy = OpenAIChatPolicy("http://localhost:8000/v1", "meta-llama/Llama-3.1-8B-Instruct")
    policy.check_ready()  # before work starts: every replica answers and serves the model

Bounded waits (HTTP through :mod:`agentrm.policies.endpoint`, ``httpx``): each attempt has a connect and a
read timeout, each request (all its retries included) a total deadline ``request_deadline_s``; a request
waiting long prints a line to stderr every ``wait_notice_s``; a server that is gone ends in
:class:`~agentrm.policies.endpoint.EndpointUnavailable` with one line naming the URL.

Concurrency: :meth:`OpenAIChatPolicy.propose_many` / :meth:`~OpenAIChatPolicy.chat_many` send up to
``max_concurrency`` requests at once from a thread pool (a server with continuous batching, or several
server replicas given as a list of base URLs, then works on them together). Results do not depend on
the concurrency: every logical call gets its index when it is submitted, in request order, and the
``seed`` it sends and the replica it goes to derive from that index, not from timing.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env
from agentrm.policies.chat import call_index_of_key, keys_of_prompts
from agentrm.policies.endpoint import (
    RETRY_STATUS,
    EndpointError,
    EndpointUnavailable,
    RequestLimits,
    check_endpoints_ready,
    post_json,
)
from agentrm.policies.prompt import AgentPrompt, ReplyStats, propose_many_validated, propose_validated

__all__ = ["RETRY_STATUS", "EndpointError", "EndpointUnavailable", "OpenAIChatPolicy", "RequestLimits",
           "check_endpoints_ready"]


_HOMES = itertools.count()  # spreads policy objects (e.g. one per episode) over replicas


class OpenAIChatPolicy:
    """Sample candidate actions (``n=k``) from an OpenAI-compatible chat endpoint.

    Waits are bounded by ``limits`` (:class:`~agentrm.policies.endpoint.RequestLimits`: per-attempt timeouts,
    retries with backoff or the server's ``Retry-After``, a total deadline per request, stderr notices while
    waiting). Other 4xx errors fail at once (:class:`EndpointError`); when the attempts or the deadline run out,
    :class:`EndpointUnavailable` (a subclass) names the URL, the attempts and the last error in one line.

    If the server returns fewer than ``n`` choices (some ignore ``n``), more requests
    are made until ``n`` replies are collected.

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended), or a list of
            replicas serving the same model. Each policy object sticks to a home replica (objects are
            spread round-robin), so a server's prompt cache keeps matching one episode's growing history;
            the ``j``-th request of a :meth:`chat_many` batch goes to the ``j``-th replica after it.
        model: model name as the server knows it.
        api_key: sent as a bearer token when given (vLLM accepts any with ``--api-key``).
        temperature, max_tokens, top_p: sampling parameters.
        limits: how long one HTTP request may take (a call to a server that ignores ``n`` makes several requests,
            each within its own deadline); its ``label`` names this client in messages (``"judge"``...).
        ready_timeout_s: :meth:`check_ready`'s timeout per replica and request.
        system_prompt: optional system message prepended to the conversation.
        prompt, max_resample: the paper-style prompt and redraws of invalid replies (as
            :class:`~agentrm.policies.hf.HFPolicy`); :attr:`reply_stats` counts them.
        seed: sent as ``seed + call index`` (vLLM and llama.cpp honour it per request) when not None.
        max_concurrency: requests in flight at once in :meth:`propose_many` / :meth:`chat_many` (``1``:
            one after another).

    Attributes:
        usage: cumulative ``requests``, ``retries``, ``prompt_tokens``, ``completion_tokens``.
        calls: logical chat calls made so far (each may take several requests).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        api_key: str | None = None,
        *,
        temperature: float = 1.0,
        max_tokens: int = 64,
        top_p: float = 1.0,
        system_prompt: str | None = None,
        seed: int | None = None,
        prompt: AgentPrompt | None = None,
        max_resample: int = 2,
        max_concurrency: int = 4,
        limits: RequestLimits | None = None,
        ready_timeout_s: float = 15.0,
    ):
        bases = [base_url] if isinstance(base_url, str) else list(base_url)
        if not bases:
            raise ValueError("base_url: give at least one endpoint")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1; got {max_concurrency}")
        if not ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be > 0 seconds; got {ready_timeout_s}")
        self.base_urls = [b.rstrip("/") for b in bases]
        self.urls = [b.rstrip("/") + "/chat/completions" for b in bases]
        self.url = self.urls[0]
        self.max_concurrency = max_concurrency
        self.calls = 0
        self._home = next(_HOMES) % len(self.urls)
        self._lock = threading.Lock()
        self.model = model
        self.api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.limits = limits or RequestLimits()
        self.label = self.limits.label
        self.ready_timeout_s = ready_timeout_s
        self.top_p = top_p
        self.system_prompt = system_prompt
        self.seed = seed
        self.prompt = prompt
        self.max_resample = max_resample
        self.reply_stats = ReplyStats()
        self.usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def check_ready(self) -> None:
        """Check every replica before work starts (:func:`~agentrm.policies.endpoint.check_endpoints_ready`):
        ``GET /models`` lists the model, or a 1-token chat request for it is answered.

        Raises:
            EndpointUnavailable: a replica did not answer (refused, timeout, 5xx); one line naming it.
            EndpointError: a replica answered but does not serve :attr:`model` (the served ones are listed)
                or refused the request (e.g. HTTP 401).
        """
        check_endpoints_ready(self.base_urls, self.model, self.api_key, self.ready_timeout_s, self.label)

    def propose(self, env: Env | None, history: Trajectory, k: int = 1) -> list[str]:
        """``k`` sampled actions for the state after ``history``, validated against ``env``'s actions."""
        return propose_validated(self, self.prompt, self.reply_stats, env, history, k, self.max_resample,
                                 greedy=self.temperature == 0)

    def propose_many(self, requests: Sequence[tuple[Env | None, Trajectory, int]]) -> list[list[str]]:
        """``propose`` for each ``(env, history, k)``: the first replies concurrently (up to
        ``max_concurrency`` requests in flight), then redraws of invalid replies in request order, so
        the result does not depend on timing."""
        return propose_many_validated(self, self.prompt, self.reply_stats, list(requests), self.max_resample,
                                      self.temperature == 0)

    def chat_many(
        self, prompts: Sequence[tuple[list[dict[str, str]], int]], temperature: float | None = None,
        keys: Sequence[str | None] | None = None,
    ) -> list[list[str]]:
        """``chat(messages, n)`` for each ``(messages, n)``, concurrently; results in prompt order.

        Call indices (hence seeds and replicas) are assigned in prompt order before any request is sent; a prompt
        with a key (``keys[i]``, see :meth:`chat`) is seeded by its key instead.
        """
        with self._lock:
            first = self.calls
            self.calls += len(prompts)
        keys = keys_of_prompts(keys, len(prompts))
        jobs = [(m, n, first + i if k is None else call_index_of_key(k), i)
                for i, ((m, n), k) in enumerate(zip(prompts, keys))]
        if self.max_concurrency == 1 or len(jobs) <= 1:
            return [self._chat(m, n, temperature, i, j) for m, n, i, j in jobs]
        failed = threading.Event()  # once a call fails, queued ones are not started: a dead server costs
        # one deadline, not one per wave of max_concurrency calls

        def run(m: list[dict[str, str]], n: int, i: int, j: int) -> list[str] | None:
            if failed.is_set():
                return None
            try:
                return self._chat(m, n, temperature, i, j)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(min(self.max_concurrency, len(jobs))) as pool:
            futures = [pool.submit(run, *job) for job in jobs]
            wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if errors:
                raise errors[0]
            return [f.result() for f in futures]

    def chat(
        self, messages: list[dict[str, str]], n: int = 1, temperature: float | None = None, key: str | None = None
    ) -> list[str]:
        """``n`` sampled replies to ``messages``; with ``key``, seeded by the key instead of the call index
        (:meth:`agentrm.policies.chat.ChatClient.chat`)."""
        with self._lock:
            index = self.calls
            self.calls += 1
        return self._chat(messages, n, temperature, index if key is None else call_index_of_key(key))

    def _chat(
        self, messages: list[dict[str, str]], n: int, temperature: float | None, index: int, slot: int = 0
    ) -> list[str]:
        """One logical call (index ``index``, ``slot``-th of its batch): requests until ``n`` replies."""
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        out: list[str] = []
        url = self.urls[(self._home + slot) % len(self.urls)]
        part = 0
        while len(out) < n:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "n": n - len(out),
                "temperature": self.temperature if temperature is None else temperature,
                "top_p": self.top_p,
                "max_tokens": self.max_tokens,
            }
            if self.seed is not None:  # a pure function of the call (and of the part of it), not of timing
                body["seed"] = self.seed + index * 1009 + part
            part += 1
            reply = self._post(body, url)
            choices = reply.get("choices")
            if not isinstance(choices, list) or not choices:
                raise EndpointError(f"{self.label}: {url}: response has no 'choices': {json.dumps(reply)[:200]}")
            for c in choices:
                content = (c.get("message") or {}).get("content")
                out.append(content if isinstance(content, str) else "")
            usage = reply.get("usage") or {}
            with self._lock:
                self.usage["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                self.usage["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        return out[:n]

    def _bump(self, key: str) -> None:
        with self._lock:
            self.usage[key] += 1

    def _post(self, body: dict[str, Any], url: str | None = None) -> dict[str, Any]:
        """POST ``body`` as JSON to ``url`` (default: the first replica) with retries within the deadline."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

        def count(attempt: int) -> None:
            self._bump("requests")
            if attempt:
                self._bump("retries")

        return post_json(url or self.url, body, headers=headers, limits=self.limits, on_attempt=count)
