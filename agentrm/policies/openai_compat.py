"""A policy backed by an OpenAI-compatible chat-completions endpoint (e.g. a vLLM server).

Uses only the standard library (``urllib``), so no client package is needed.  The
server must implement ``POST {base_url}/chat/completions`` with the ``n`` parameter, as
vLLM's OpenAI-compatible server does::

    vllm serve meta-llama/Llama-3.1-8B-Instruct --port 8000
    OpenAIChatPolicy("http://localhost:8000/v1", "meta-llama/Llama-3.1-8B-Instruct")
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env
from agentrm.policies.prompt import AgentPrompt, ReplyStats, propose_validated

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """The endpoint could not be reached, or answered with an error or a malformed body."""


class OpenAIChatPolicy:
    """Sample candidate actions (``n=k``) from an OpenAI-compatible chat endpoint.

    Retries: connection errors, timeouts, HTTP 408/409/429 and 5xx are retried up to
    ``max_retries`` times, waiting ``backoff * 2**attempt`` seconds (or the server's
    ``Retry-After``, capped at ``max_backoff``).  Other 4xx errors fail at once.  When
    all attempts fail, :class:`EndpointError` names the URL and the last error.

    If the server returns fewer than ``n`` choices (some ignore ``n``), more requests
    are made until ``n`` replies are collected.

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended).
        model: model name as the server knows it.
        api_key: sent as a bearer token when given (vLLM accepts any with ``--api-key``).
        temperature, max_tokens, top_p: sampling parameters.
        timeout: per-request timeout in seconds.
        max_retries: retries after the first attempt.
        backoff: base of the exponential backoff in seconds.
        max_backoff: longest single wait.
        system_prompt: optional system message prepended to the conversation.
        seed: sent as ``seed`` (vLLM honours it per request) when not None.
        prompt, max_resample: the paper-style prompt and redraws of invalid replies (as
            :class:`~agentrm.policies.hf.HFPolicy`); :attr:`reply_stats` counts them.

    Attributes:
        usage: cumulative ``requests``, ``retries``, ``prompt_tokens``, ``completion_tokens``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 1.0,
        max_tokens: int = 64,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        top_p: float = 1.0,
        max_backoff: float = 30.0,
        system_prompt: str | None = None,
        seed: int | None = None,
        prompt: AgentPrompt | None = None,
        max_resample: int = 2,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.top_p = top_p
        self.max_backoff = max_backoff
        self.system_prompt = system_prompt
        self.seed = seed
        self.prompt = prompt
        self.max_resample = max_resample
        self.reply_stats = ReplyStats()
        self.usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def propose(self, env: Env | None, history: Trajectory, k: int = 1) -> list[str]:
        """``k`` sampled actions for the state after ``history``, validated against ``env``'s actions."""
        return propose_validated(self, self.prompt, self.reply_stats, env, history, k, self.max_resample,
                                 greedy=self.temperature == 0)

    def chat(self, messages: list[dict[str, str]], n: int = 1, temperature: float | None = None) -> list[str]:
        """``n`` sampled replies to ``messages``."""
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        out: list[str] = []
        while len(out) < n:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "n": n - len(out),
                "temperature": self.temperature if temperature is None else temperature,
                "top_p": self.top_p,
                "max_tokens": self.max_tokens,
            }
            if self.seed is not None:
                body["seed"] = self.seed + self.usage["requests"]
            reply = self._post(body)
            choices = reply.get("choices")
            if not isinstance(choices, list) or not choices:
                raise EndpointError(f"{self.url}: response has no 'choices': {json.dumps(reply)[:200]}")
            for c in choices:
                content = (c.get("message") or {}).get("content")
                out.append(content if isinstance(content, str) else "")
            usage = reply.get("usage") or {}
            self.usage["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            self.usage["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        return out[:n]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON with retries; return the decoded JSON reply."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.usage["retries"] += 1
            self.usage["requests"] += 1
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError as e:
                    raise EndpointError(
                        f"{self.url}: response is not JSON ({e.msg}): {raw[:200]!r}"
                    ) from None
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code not in RETRY_STATUS:
                    raise EndpointError(f"{self.url}: {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(self.max_backoff, float(retry_after))
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                time.sleep(wait)
        raise EndpointError(
            f"chat-completions endpoint {self.url} failed after {self.max_retries + 1} attempts; last error: {last}"
        )
