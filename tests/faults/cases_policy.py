"""Fault cases: ``python -m agentrm.search`` with an ``openai`` policy pointed at a server that is not usable.

Each case starts a fake server (:mod:`tests.policies.fake_openai`) in the test process, writes a search
config pointing at it and runs the command in a subprocess. Expected: exit code 2 within a bounded time and
stderr's last line naming the URL and what happened (the readiness check before work starts, or the
request deadline once work has started), never a multi-minute stall or a traceback.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.harness import FaultCase, Outcome, run_module
from tests.policies.fake_openai import ChatServer, HungServer, closed_port_url

MODEL = "tiny-policy"
BOUND_S = 90.0  # seconds a case may take, start-up included (the waits inside are 15 s at most)


def _config(directory: Path, base_url: str, policy_extra: dict[str, Any]) -> Path:
    extra = "".join(f"  {k}: {v}\n" for k, v in policy_extra.items())
    path = directory / "search.yaml"
    path.write_text(
        f"out_dir: {directory / 'out'}\n"
        "held_in: [babyai:GoToRedBall?max_steps=4]\n"
        "episodes: 1\n"
        "seed: 1000\n"
        "policy:\n"
        "  kind: openai\n"
        f"  base_url: {base_url}\n"
        f"  model: {MODEL}\n"
        "  max_new_tokens: 8\n"
        f"{extra}"
        "scorers: []\n"
        "greedy: true\n"
        "best_of_n: []\n"
        "beam: []\n"
        "num_threads: 1\n"
        "progress: false\n"
    )
    return path


def _search_against(server: Callable[[], contextlib.AbstractContextManager] | None,
                    policy_extra: dict[str, Any] | None = None) -> Callable[[Path], Outcome]:
    """A case's ``run``: start ``server`` (``None``: a closed port), run the search on it, record URL and time."""

    def run(directory: Path) -> Outcome:
        with server() if server else contextlib.nullcontext() as srv:
            url = srv.url if srv is not None else closed_port_url()
            cfg = _config(directory, url, policy_extra or {})
            (directory / "url.txt").write_text(url)
            t0 = time.monotonic()
            try:
                out = run_module("agentrm.search", ["--config", str(cfg)], directory, timeout=BOUND_S + 30)
            except subprocess.TimeoutExpired:
                out = Outcome(-9, "", f"killed: still running after {BOUND_S + 30:.0f} s")
            (directory / "elapsed_s.txt").write_text(f"{time.monotonic() - t0:.1f}")
        return out

    return run


def _named_and_bounded(directory: Path, out: Outcome) -> None:
    url = (directory / "url.txt").read_text()
    elapsed = float((directory / "elapsed_s.txt").read_text())
    assert url in out.last_line, f"the error does not name {url}: {out.last_line!r}"
    assert elapsed < BOUND_S, f"took {elapsed:.0f} s (bound {BOUND_S:.0f} s)"
    episodes = directory / "out" / "episodes.jsonl"
    assert not episodes.is_file() or not episodes.read_text().strip(), "episodes recorded without a policy answer"


_URL = r"http://127\.0\.0\.1:\d+/v1"

CASES: list[FaultCase] = [
    FaultCase(
        id="search/openai-closed-port",
        covers="openai policy on a port where nothing listens: refused before work starts (not retried mid-run)",
        run=_search_against(None),
        message=rf"{_URL} is not reachable: cannot connect \(.*\)",
        check=_named_and_bounded,
    ),
    FaultCase(
        id="search/openai-hung-server",
        covers="openai server accepting connections but never answering: readiness check times out, no stall",
        run=_search_against(HungServer, {"ready_timeout_s": 3}),
        message=rf"{_URL} is not reachable: no answer to GET {_URL}/models within 3 s",
        check=_named_and_bounded,
    ),
    FaultCase(
        id="search/openai-model-not-served",
        covers="openai server without the configured model: refused before work starts, served models listed",
        run=_search_against(lambda: ChatServer(models=["other-model"], accept={"other-model"})),
        message=rf"{_URL} does not serve model '{re.escape(MODEL)}' \(it serves 'other-model'\)",
        check=_named_and_bounded,
    ),
    FaultCase(
        id="search/openai-hangs-mid-run",
        covers="openai server that passes the check, then never answers a request: fails at request_deadline_s",
        run=_search_against(lambda: ChatServer(models=[MODEL], hang_chat=True), {"request_deadline_s": 3}),
        message=rf"{_URL}/chat/completions did not answer within 3 s \(\d+ attempts? in \d+\.\d s\); last error: ",
        check=_named_and_bounded,
    ),
]
