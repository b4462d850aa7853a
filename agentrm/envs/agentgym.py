"""Client for AgentGym's HTTP environment servers (``agentenv-*``: BabyAI, TextCraft, WebShop, ...).

The API, as the AgentGym env servers (FastAPI) expose it::

    POST /create                     -> {"id": int, ...}          a new environment instance
    POST /reset  {"id", "data_idx"}  -> {"observation", "reward", "done", ...}
    GET  /observation?id=ID          -> str                       the current observation
    POST /step   {"id", "action"}    -> {"observation", "reward", "done", "score"?, ...}
    POST /close  {"id"}              (only on some servers; tried, a 404 is ignored)

Errors come back as ``{"error": "..."}`` with status 200; they raise :class:`AgentGymError`.
``data_idx`` selects the task, so :meth:`AgentGymEnv.reset`'s ``seed`` is the data index.
Every request has a timeout and is retried with exponential backoff on connection
errors, timeouts and 5xx answers; when the server stays unreachable the error names the URL.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from agentrm.envs.base import replay

if TYPE_CHECKING:
    from agentrm.envs.registry import EnvSpec


class AgentGymError(RuntimeError):
    """The environment server answered with an error, or could not be reached."""


class AgentGymEnv:
    """:class:`agentrm.envs.base.Env` over an AgentGym environment server.

    Args:
        base_url: e.g. ``http://127.0.0.1:36001`` (the ``env_server_base`` of AgentGym clients).
        env_name: informational (shown in errors), e.g. ``"babyai"``.
        timeout: seconds per request.
        max_retries: retries after the first attempt on transient failures.
        backoff: first retry delay in seconds, doubled each retry.
        valid_actions: canonical actions for prompts/exploration (servers do not list them).
        instruction: task description; default is the first observation of the episode.

    ``clone()`` creates a new server instance and :func:`replay`s the seed and the actions
    taken so far (exact for deterministic environments, costs one request per action;
    ``clone_mode = "replay"``); ``close()`` releases the server-side instance.

    Spec: ``agentgym:<env_name>@<base_url>``, e.g. ``agentgym:webshop@http://127.0.0.1:36001``.
    """

    clone_mode = "replay"

    def __init__(
        self,
        base_url: str,
        env_name: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        valid_actions: list[str] | None = None,
        instruction: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.env_name = env_name or "agentgym"
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self._valid_actions = list(valid_actions or [])
        self._fixed_instruction = instruction
        self._instruction = instruction or ""
        self.seed: int | None = None
        self.actions: list[str] = []
        created = self._request("POST", "/create", {})
        if not isinstance(created, dict) or "id" not in created:
            raise AgentGymError(f"{self.base_url}/create: expected {{'id': ...}}, got {created!r}")
        self.env_id = created["id"]
        self.spec: EnvSpec | None = None
        self.closed = False

    # ---- Env protocol --------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        return self._instruction

    @property
    def valid_actions(self) -> list[str]:
        return list(self._valid_actions)

    def reset(self, seed: int) -> str:
        """Start task ``data_idx = seed``; return its first observation."""
        out = self._request("POST", "/reset", {"id": self.env_id, "data_idx": int(seed)})
        self.seed, self.actions = int(seed), []
        obs = out.get("observation") if isinstance(out, dict) else None
        if obs is None:
            obs = self.observation()
        if self._fixed_instruction is None:
            self._instruction = str(obs)
        return str(obs)

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.seed is None:
            raise AgentGymError(f"{self.base_url}: step() before reset()")
        out = self._request("POST", "/step", {"id": self.env_id, "action": action})
        if not isinstance(out, dict) or "observation" not in out:
            raise AgentGymError(f"{self.base_url}/step: unexpected answer {out!r}")
        self.actions.append(action)
        reward = float(out.get("reward", 0.0) or 0.0)
        done = bool(out.get("done", False))
        info = {k: v for k, v in out.items() if k not in ("observation", "reward", "done")}
        info.setdefault("success", bool(out.get("success", out.get("won", done and reward > 0))))
        return str(out["observation"]), reward, done, info

    def clone(self) -> AgentGymEnv:
        """A fresh server instance brought to this state by replaying seed + actions."""
        if self.seed is None:
            return self._spawn()
        return replay(self._spawn, self.seed, self.actions)

    # ---- extras --------------------------------------------------------------------------
    def observation(self) -> str:
        """``GET /observation?id=``: the current observation."""
        return str(self._request("GET", "/observation", {"id": self.env_id}))

    def expert_policy(self, error_rate: float = 0.0, seed: int = 0):
        """AgentGym servers expose no expert: collect with an LM policy instead."""
        raise NotImplementedError(
            f"{self.env_name} (AgentGym server) has no scripted expert; use an LM policy (hf or openai)"
        )

    def instance_key(self, seed: int) -> str:
        """``agentgym:<env_name>#idx=<data_idx>``: a task instance is the server's data index."""
        return f"agentgym:{self.env_name}#idx={int(seed)}"

    def close(self) -> None:
        """``POST /close`` where the server has it (a 404 is ignored); idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self._request("POST", "/close", {"id": self.env_id}, retries=0)
        except AgentGymError as e:
            if "HTTP 404" not in str(e):
                raise

    def _spawn(self) -> AgentGymEnv:
        env = AgentGymEnv(
            self.base_url,
            self.env_name,
            self.timeout,
            self.max_retries,
            self.backoff,
            self._valid_actions,
            self._fixed_instruction,
        )
        env.spec = self.spec
        return env

    def _request(self, method: str, path: str, payload: dict[str, Any], retries: int | None = None) -> Any:
        url = self.base_url + path
        if method == "GET":
            req = urllib.request.Request(f"{url}?{urllib.parse.urlencode(payload)}", method="GET")
        else:
            req = urllib.request.Request(
                url,
                data=json.dumps(payload).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
        retries = self.max_retries if retries is None else retries
        last: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read().decode()
                break
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise AgentGymError(f"{self.env_name} server {url}: HTTP {e.code} {e.reason}") from e
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
        else:
            raise AgentGymError(
                f"{self.env_name} environment server at {url} is not reachable after {retries + 1} attempt(s) "
                f"({last}); is it running? (e.g. `babyai --host 127.0.0.1 --port PORT` from agentenv-babyai)"
            ) from last
        try:
            out = json.loads(body)
        except json.JSONDecodeError:
            out = body
        if isinstance(out, dict) and "error" in out:
            raise AgentGymError(f"{self.env_name} server {url}: {out['error']}")
        return out


def make(spec: EnvSpec) -> AgentGymEnv:
    """Registry factory: ``agentgym:<env_name>@<base_url>`` with options ``timeout``, ``max_retries``, ``backoff``."""
    if not spec.split.startswith(("http://", "https://")):
        raise ValueError(f"env spec {str(spec)!r}: AgentGym needs the server URL, e.g. agentgym:webshop@http://127.0.0.1:36001")
    opts = {k: spec.options[k] for k in ("timeout", "max_retries", "backoff") if k in spec.options}
    return AgentGymEnv(spec.split, spec.task, **opts)
