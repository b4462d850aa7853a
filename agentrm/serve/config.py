"""The typed config of ``python -m agentrm.serve`` (one dataclass, YAML and flags; checked before any work)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace

from agentrm.checks import at_least, fail, one_of
from agentrm.scoring.cache import parse_bytes
from agentrm.search.specs import ScorerSpec
from agentrm.serve.schema import Limits

LOCAL_HOSTS = ("127.0.0.1", "localhost")
ANY_HOSTS = ("0.0.0.0", "::")  # LitServe binds these three addresses only
MIN_KEY_CHARS = 16
SERVED_CLASSES = {"ValueRewardModel": "value_rm", "ImplicitPRM": "implicit_prm"}


@dataclass
class ServeConfig:
    """``python -m agentrm.serve``: serve an exported reward model over HTTP (LitServe; see docs/serving.md).

    Attributes:
        model: the exported RM directory (value RM or implicit PRM; the kind is read from its
            ``agentrm_config.json``). Same as ``scorer.path``.
        scorer: how the model is loaded and scored, as in a search config's scorer (``device``, ``dtype``,
            ``quantization``, ``attn_implementation``, ``max_length``, ``aggregate``, ``batch_size``).
        host: ``127.0.0.1`` (default; this machine only) or ``0.0.0.0`` / ``::`` (every interface: refused
            unless an API key is set in the environment variable ``api_key_env``).
        port: TCP port (1024-65535).
        api_key_env: the environment variable holding the API key (never the key itself in a config).
            When it is set, every route needs ``Authorization: Bearer <key>``; keys shorter than 16
            characters are refused.
        max_batch_size, batch_timeout: LitServe's dynamic batching: requests arriving within ``batch_timeout``
            seconds of each other, up to ``max_batch_size``, are scored together (1: no batching). Default
            (``None``): 16 on CUDA, 1 on a CPU, where the forward is compute-bound and batching measured slower
            (bench/RESULTS.md).
        workers: inference worker processes per device (each loads the model and keeps its own sessions).
        fast_queue: LitServe's ZeroMQ transport between the HTTP process and the workers instead of
            multiprocessing-manager queues.
        request_timeout: seconds a request may wait in the queue before it is answered 504.
        max_request_bytes, max_items, max_candidates, max_sequence_tokens: per-request limits (422/413 with
            the limit named): body size, trajectories or prefixes, candidates in all, tokens of one sequence
            (a trajectory, or a prefix with one candidate).
        max_queue: requests in flight at once; one more is answered 503 with ``Retry-After``.
        cache_bytes: prefix-cache bytes over all sessions; session_cache_bytes: per session;
        session_cache_entries: entries per model in one session's cache; max_sessions: sessions kept.
        num_threads: torch CPU threads in the worker (None: torch's default).
        log_level: LitServe/uvicorn log level (``warning`` keeps the access log quiet).
    """

    model: str | None = None
    scorer: ScorerSpec = field(default_factory=ScorerSpec)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str = "AGENTRM_SERVE_API_KEY"
    max_batch_size: int | None = None
    batch_timeout: float = 0.01
    workers: int = 1
    fast_queue: bool = False
    request_timeout: float = 60.0
    max_request_bytes: int = 4 * 2**20
    max_items: int = 64
    max_candidates: int = 256
    max_sequence_tokens: int = 16384
    max_queue: int = 64
    cache_bytes: str = "1GiB"
    session_cache_bytes: str = "256MiB"
    session_cache_entries: int = 256
    max_sessions: int = 64
    num_threads: int | None = None
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if self.model is not None and self.scorer.path is not None and self.model != self.scorer.path:
            fail("model", f"{self.model!r} and scorer.path {self.scorer.path!r} disagree; give one")
        if not (self.model or self.scorer.path):
            fail("model", "give the exported RM directory (e.g. --model runs/tiny_value_rm/hf_model)")
        one_of(self.scorer.kind, tuple(SERVED_CLASSES.values()), "scorer.kind")
        if self.scorer.outcome_blind is not None or self.scorer.exclude_final_step is not None:
            fail("scorer.outcome_blind", "the server scores what it is given; blindness is the client's (a remote "
                                         "scorer's outcome_blind, which withholds before sending)")
        one_of(self.host, LOCAL_HOSTS + ANY_HOSTS, "host")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1024 <= self.port <= 65535:
            fail("port", f"must be in 1024..65535, got {self.port!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env or ""):
            fail("api_key_env", f"must name an environment variable, got {self.api_key_env!r}")
        at_least(self.max_batch_size, 1, "max_batch_size", allow_none=True)
        for name in ("workers", "max_request_bytes", "max_items", "max_candidates",
                     "max_sequence_tokens", "max_queue", "session_cache_entries", "max_sessions"):
            at_least(getattr(self, name), 1, name)
        at_least(self.num_threads, 1, "num_threads", allow_none=True)
        at_least(self.batch_timeout, 0.0, "batch_timeout")
        if isinstance(self.request_timeout, bool) or not isinstance(self.request_timeout, (int, float)) \
                or self.request_timeout <= self.batch_timeout:
            fail("request_timeout", f"must be a number of seconds > batch_timeout ({self.batch_timeout}), "
                                    f"got {self.request_timeout!r}")
        total, per = self.cache_sizes()
        if per > total:
            fail("session_cache_bytes", f"{self.session_cache_bytes} exceeds cache_bytes={self.cache_bytes}")
        one_of(self.log_level, ("critical", "error", "warning", "info", "debug", "trace"), "log_level")

    def cache_sizes(self) -> tuple[int, int]:
        """``(cache_bytes, session_cache_bytes)`` in bytes."""
        out = []
        for name in ("cache_bytes", "session_cache_bytes"):
            try:
                value = parse_bytes(getattr(self, name), name)
            except ValueError as e:
                fail(name, str(e).removeprefix(f"{name} "))
            if value is None:
                fail(name, "give a size such as '1GiB' ('auto' is for in-process scorers)")
            out.append(value)
        return out[0], out[1]

    @property
    def limits(self) -> Limits:
        return Limits(self.max_request_bytes, self.max_items, self.max_candidates, self.max_sequence_tokens,
                      self.max_queue)

    def batch_size_for(self, device_type: str) -> int:
        """``max_batch_size``, or its default for a model placed on ``device_type`` (see the attribute)."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return 16 if device_type == "cuda" else 1

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS

    @property
    def bind_host(self) -> str:
        return "127.0.0.1" if self.host == "localhost" else self.host

    def api_key(self) -> str | None:
        """The key from ``api_key_env``; refuses a non-local bind without one, and short keys (one line)."""
        key = os.environ.get(self.api_key_env) or None
        if key is None and not self.is_local:
            fail("host", f"{self.host} is reachable from other machines: set an API key ({MIN_KEY_CHARS}+ characters) "
                         f"in the environment variable {self.api_key_env} (api_key_env); clients send it as "
                         "'Authorization: Bearer <key>'")
        if key is not None and len(key) < MIN_KEY_CHARS:
            fail("api_key_env", f"the key in {self.api_key_env} has {len(key)} characters; use at least {MIN_KEY_CHARS}")
        return key

    def served_spec(self) -> ScorerSpec:
        """The scorer spec to serve: ``scorer`` with ``path = model`` and the kind the directory records."""
        from agentrm.paths import resolve_path

        path = self.model or self.scorer.path
        try:
            d = resolve_path(path)
        except FileNotFoundError as e:
            fail("model", str(e))
        cfg_file = d / "agentrm_config.json"
        if not cfg_file.is_file():
            fail("model", f"{str(d)!r} is not an exported agentrm reward model (agentrm_config.json missing)")
        try:
            cls = json.loads(cfg_file.read_text()).get("model_class")
        except (json.JSONDecodeError, AttributeError) as e:
            fail("model", f"{cfg_file}: not a JSON object ({e})")
        if cls not in SERVED_CLASSES:
            fail("model", f"{cfg_file} holds a {cls!r}; the server serves {' or '.join(SERVED_CLASSES)}")
        return replace(self.scorer, kind=SERVED_CLASSES[cls], path=str(path))
