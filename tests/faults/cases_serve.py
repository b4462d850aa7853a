"""Fault cases for ``python -m agentrm.serve`` and the remote scorer (``kind: remote``) in ``agentrm.search``.

A server that would be unsafe or cannot serve refuses to start, in one line naming the option, before any
model is loaded; a remote scorer that cannot reach or authenticate to its server stops the search in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.faults.cases_commands import save_rm, search_config
from tests.faults.harness import FaultCase

KEY_ENV = "AGENTRM_FAULT_SERVE_KEY"


def _rm(d: Path) -> None:
    save_rm(d / "rm", 0)


def _not_an_rm(d: Path) -> None:
    (d / "plain").mkdir()
    (d / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))


def _serve(id: str, covers: str, args: list[str], message: str, env: dict[str, str] | None = None,
           setup=_rm) -> FaultCase:
    return FaultCase(id=id, covers=covers, module="agentrm.serve", args=args, setup=setup, message=message,
                     env={KEY_ENV: "", **(env or {})}, timeout=120)


def _remote_search(id: str, covers: str, scorer: dict, message: str, env: dict[str, str] | None = None) -> FaultCase:
    def setup(d: Path) -> None:
        search_config(d, scorers=[{"kind": "remote", "name": "remote", **scorer}])

    return FaultCase(id=id, covers=covers, module="agentrm.search", args=["--config", "{d}/search.yaml"],
                     setup=setup, message=message, env=env or {}, timeout=120)


MODEL = ["--model", "{d}/rm", "--api_key_env", KEY_ENV]

CASES = [
    _serve("serve/non-local-bind-without-key", "binding every interface without an API key is refused",
           [*MODEL, "--host", "0.0.0.0"], r"error: host: 0\.0\.0\.0 is reachable from other machines: set an API key"),
    _serve("serve/short-key", "a guessable (short) API key is refused", [*MODEL, "--host", "0.0.0.0"],
           rf"error: api_key_env: the key in {KEY_ENV} has 5 characters; use at least 16", env={KEY_ENV: "12345"}),
    _serve("serve/missing-model", "a model directory that is not there", ["--model", "{d}/nope"],
           r"error: model: .*nope"),
    _serve("serve/not-an-rm", "a directory that is not an exported reward model", ["--model", "{d}/plain"],
           r"error: model: .*is not an exported agentrm reward model", setup=_not_an_rm),
    _serve("serve/bad-queue-limit", "a queue limit below 1", [*MODEL, "--max_queue", "0"],
           r"error: max_queue: must be >= 1, got 0"),
    _serve("serve/bad-port", "a privileged or impossible port", [*MODEL, "--port", "80"],
           r"error: port: must be in 1024\.\.65535, got 80"),
    _serve("serve/session-cache-over-total", "a per-session cache larger than the whole cache",
           [*MODEL, "--cache_bytes", "1MiB", "--session_cache_bytes", "2MiB"],
           r"error: session_cache_bytes: 2MiB exceeds cache_bytes=1MiB"),
    _remote_search("serve/remote-key-env-unset", "a remote scorer whose key variable is not set",
                   {"url": "http://127.0.0.1:9", "api_key_env": KEY_ENV},
                   rf"error: scorers\[0\]\.api_key_env: the environment variable {KEY_ENV} is not set"),
    _remote_search("serve/remote-server-gone", "a remote scorer whose server is not there: one line, bounded wait",
                   {"url": "http://127.0.0.1:9", "request_deadline_s": 2},
                   r"error: remote scorer: http://127\.0\.0\.1:9/health is not reachable: cannot connect"),
    _remote_search("serve/remote-not-http", "a remote scorer URL that is not http(s)", {"url": "ftp://127.0.0.1:9"},
                   r"error: scorers\[0\]\.url: scorer kind 'remote' needs the server's http\(s\) base URL"),
]
