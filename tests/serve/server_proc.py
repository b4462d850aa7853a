"""Real ``python -m agentrm.serve`` processes for the serving tests and benchmarks (no mocks).

:class:`ServerProcess` starts the command in a new process group on a free local port, waits until
``GET /health`` answers 200, and stops it (SIGTERM, then SIGKILL of the whole group). Tiny exported RMs come
from :func:`export_tiny_models`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from agentrm.paths import PROJECT_ROOT

TOKENIZER = "agentrm/assets/tiny_tokenizer"
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 2048}
KEY_ENV = "AGENTRM_TEST_SERVE_KEY"
KEY = "test-key-0123456789abcdef"


def export_tiny_models(root: Path, seed: int = 0) -> dict[str, str]:
    """A tiny random value RM (sigmoid head) and implicit PRM exported under ``root``: ``{kind: directory}``."""
    import torch

    from agentrm.models.backbone import build_backbone
    from agentrm.models.implicit_prm import ImplicitPRM
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    torch.manual_seed(seed)
    rm = ValueRewardModel(build_backbone(config=TINY, vocab_size=len(tok)), value_activation="sigmoid")
    prm = ImplicitPRM(build_backbone(config=TINY, vocab_size=len(tok), causal_lm=True))
    return {"value_rm": str(rm.save_pretrained(root / "rm", tokenizer=tok)),
            "implicit_prm": str(prm.save_pretrained(root / "prm", tokenizer=tok))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", "AGENTRM_DEBUG": "", **(extra or {})}


class ServerProcess:
    """``python -m agentrm.serve --model <model> <args>`` on a free port (a context manager).

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        proc: the ``subprocess.Popen`` (its own process group).
        log: the file holding its stdout and stderr.
    """

    def __init__(self, model: str, args: list[str] | None = None, key: str | None = KEY, port: int | None = None,
                 log: Path | None = None, ready_timeout: float = 180.0):
        self.model, self.args, self.key = model, list(args or []), key
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(f"/tmp/agentrm-serve-{self.port}.log")
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def start(self) -> ServerProcess:
        env = server_env({KEY_ENV: self.key} if self.key else None)
        argv = [sys.executable, "-m", "agentrm.serve", "--model", self.model, "--port", str(self.port),
                "--api_key_env", KEY_ENV, *self.args]
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", headers=self.headers, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"server not ready within {self.ready_timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL to the whole process group (the main process, the worker, the HTTP process, the manager)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._reap_group()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the main process (graceful shutdown); SIGKILL to the group if it does not end in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        return self.proc.returncode

    def _reap_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind, if any
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
