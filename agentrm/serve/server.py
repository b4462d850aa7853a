"""``python -m agentrm.serve``: an exported reward model behind HTTP, on LitServe.

One process tree: the main process (resolves the model, checks the bind and the key, then supervises), one
inference worker per device and ``workers`` (spawned; loads the model, :mod:`agentrm.serve.api`) and one HTTP
process (uvicorn, forked; validation and limits, :mod:`agentrm.serve.spec`). Routes besides the scoring ones
(LitServe's): ``GET /health`` (200 ``ok`` once the model is loaded, 503 before: readiness), ``GET /info``
(``{"model": {...}}``: kind, backbone, chat template, max length, aggregate, how withheld steps are read, the
weights fingerprint, the limits). With a key every route needs ``Authorization: Bearer <key>``.

Shutdown (SIGTERM or Ctrl+C): the HTTP process stops accepting connections and finishes the requests in
flight (up to 30 s), then the workers stop; the exit code is 0.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import sys
from typing import Any

from fastapi import HTTPException, Request

from agentrm.cli_config import parse_config
from agentrm.cli_errors import BuildError, building, run_cli
from agentrm.search.resolve import ResolvedScorer, resolve_scorer
from agentrm.serve.config import ServeConfig

API_VERSION = 1
WITHHELD_READING = {
    "value_rm": "a withheld step (no reply) is read as the state before it: the previous step's value, or the "
                "initial state's; withheld candidates of one prefix therefore tie",
    "implicit_prm": "a withheld step is scored on its action tokens, which precede the reply: unchanged",
}


class BearerAuth:
    """``Authorization: Bearer <key>`` checked in constant time against the key in ``env_name``.

    A FastAPI dependency (LitServe runs ``LitAPI.authorize`` on every route). The key is read from the
    environment of the process that checks it, so it is never pickled into the worker nor written anywhere.
    """

    def __init__(self, env_name: str):
        self.env_name = env_name

    def __call__(self, request: Request) -> None:
        key = os.environ.get(self.env_name, "").encode()
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not key or scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})


def model_info(resolved: ResolvedScorer, config: ServeConfig) -> dict[str, Any]:
    """What ``GET /info`` reports under ``model`` (read from the directory; nothing is loaded)."""
    d = resolved.path
    backbone_cfg = d / ("config.json" if resolved.spec.kind == "value_rm" else "policy/config.json")
    if not backbone_cfg.is_file():
        backbone_cfg = d / "config.json"
    bb = json.loads(backbone_cfg.read_text()) if backbone_cfg.is_file() else {}
    template = ""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        f = d / name
        if f.is_file():
            text = f.read_text()
            template = text if name.endswith(".jinja") else str(json.loads(text).get("chat_template") or "")
            if template:
                break
    return {
        "api_version": API_VERSION,
        "kind": resolved.spec.kind,
        "path": str(d),
        "fingerprint": resolved.fingerprint,
        "backbone": {k: bb.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")},
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
        "max_length": resolved.settings.get("max_length"),
        "aggregate": resolved.settings.get("aggregate"),
        "value_activation": resolved.config.get("value_activation"),
        "outcome_blindness": {"server_withholds": False, "withheld_steps": WITHHELD_READING[resolved.spec.kind]},
        "placement": {"device": str(resolved.placement.device), "dtype": str(resolved.placement.dtype).removeprefix("torch."),
                      "quantization": resolved.placement.quantization},
        "limits": config.limits.as_dict(),
        "batching": {"max_batch_size": config.batch_size_for(resolved.placement.device.type),
                     "batch_timeout": config.batch_timeout},
    }


def build_server(config: ServeConfig, resolved: ResolvedScorer, api_key: str | None):
    """The ``LitServer`` (not started)."""
    import litserve as ls

    from agentrm.serve.api import RewardModelAPI
    from agentrm.serve.spec import RewardModelSpec

    total, per = config.cache_sizes()
    spec = RewardModelSpec(config.limits, str(resolved.path), config.request_timeout)
    api = RewardModelAPI(
        resolved, (config.session_cache_entries, per, total, config.max_sessions), config.num_threads,
        BearerAuth(config.api_key_env) if api_key else None, spec,
        config.batch_size_for(resolved.placement.device.type), config.batch_timeout,
    )
    accelerator = "cuda" if resolved.placement.device.type == "cuda" else "cpu"
    return ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=config.workers,
                        timeout=config.request_timeout, model_metadata=model_info(resolved, config),
                        disable_openapi_url=True, fast_queue=config.fast_queue)


_MAIN_PID = os.getpid()


def _stop_on_sigterm(signum, frame) -> None:
    if os.getpid() != _MAIN_PID:  # the forked HTTP process, re-raising the signal after its own graceful exit
        raise SystemExit(0)
    raise KeyboardInterrupt  # LitServe's run() shuts down gracefully on it


def serve(config: ServeConfig) -> None:
    """Resolve the model, check the bind and the key, then serve until SIGTERM / Ctrl+C (see the module doc)."""
    with building():
        api_key = config.api_key()
        resolved = resolve_scorer(config.served_spec(), "scorer")
    server = build_server(config, resolved, api_key)
    auth = f"bearer key from ${config.api_key_env}" if api_key else "none (this machine only)"
    print(f"agentrm.serve: {resolved.spec.kind} {resolved.path} (fingerprint {resolved.fingerprint}) on "
          f"http://{config.bind_host}:{config.port}; auth: {auth}; GET /health answers 200 once the model is loaded",
          file=sys.stderr, flush=True)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        server.run(host=config.bind_host, port=config.port, num_api_servers=1, log_level=config.log_level,
                   generate_client_file=False)
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        if "workers failed to start" in str(e):
            raise BuildError(f"model: the inference worker could not load {resolved.path} (its error is above)") from e
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        for worker in getattr(server, "inference_workers", []) or []:
            if worker.is_alive():  # stopped before LitServe's own shutdown ran (a signal during startup)
                worker.terminate()
                worker.join(timeout=10)
    print("agentrm.serve: stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    serve(parse_config(ServeConfig, argv, "agentrm.serve"))


def cli(argv: list[str] | None = None) -> None:
    """``python -m agentrm.serve``: :func:`main`, a config that cannot be served reported in one line (exit 2)."""
    run_cli("agentrm.serve", main, argv)
