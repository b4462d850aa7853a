"""The OpenAI-compatible policy and the judge against a real llama.cpp server (SmolLM2-135M, CPU, 127.0.0.1).

Opt-in (``-m server``; excluded from the default run): needs ``bash scripts/build_llama_server.sh``.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from agentrm.data.schema import Step
from agentrm.judge import JudgeScorer
from agentrm.policies.base import start_history
from agentrm.policies.openai_compat import EndpointError, OpenAIChatPolicy, RequestLimits

pytestmark = pytest.mark.server
pytest.importorskip("llama_cpp", reason="run scripts/build_llama_server.sh")
from agentrm.policies.llama_server import LlamaServer, smollm2_gguf  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with LlamaServer(smollm2_gguf(), n_threads=1) as srv:
        yield srv
    assert srv.proc.poll() is not None  # shut down


def _history(i: int = 0):
    h = start_history("GoToRedBall", f"Go to the red ball. You see a wall {i + 1} steps ahead.", f"e{i}")
    h.steps.append(Step("turn left", "You see a red ball 2 steps ahead."))
    return h


def test_policy_samples_and_is_deterministic_across_concurrency(server):
    kw = dict(temperature=0.8, max_tokens=12, seed=5, limits=RequestLimits(read_timeout=60, max_retries=1))
    reqs = [(None, _history(i), 2) for i in range(4)]
    seq = OpenAIChatPolicy(server.base_url, "smollm2", max_concurrency=1, **kw)
    par = OpenAIChatPolicy(server.base_url, "smollm2", max_concurrency=4, **kw)
    a, b = seq.propose_many(reqs), par.propose_many(reqs)
    assert [len(x) for x in a] == [2] * 4 and all(isinstance(t, str) for x in a for t in x)
    assert a == b  # same per-call seeds whatever the concurrency
    assert seq.usage["completion_tokens"] > 0 and seq.usage["requests"] >= 4  # llama.cpp ignores n: more requests


def test_judge_against_the_server(server):
    client = OpenAIChatPolicy(server.base_url, "smollm2", max_tokens=24, seed=1, limits=RequestLimits(read_timeout=60, max_retries=1))
    judge = JudgeScorer(client, "pointwise", samples=1, temperature=0.0)
    h = _history()
    scores = judge.score_candidates(h, [Step("go forward", "You reach the red ball."), Step("turn right", "A wall.")])
    assert scores.shape == (2,) and all(math.isnan(s) or 0 <= s <= 10 for s in scores.tolist())
    assert client.usage["requests"] >= 2 and judge.counters.candidates == 2


def test_server_killed_mid_run_fails_clearly_and_in_bounded_time():
    srv = LlamaServer(smollm2_gguf(), n_threads=1).start()
    try:
        policy = OpenAIChatPolicy(srv.base_url, "smollm2", max_tokens=48, max_concurrency=2, seed=0, limits=RequestLimits(read_timeout=10, max_retries=2, backoff=0.1))
        reqs = [(None, _history(i), 1) for i in range(8)]
        threading.Timer(1.0, srv.kill).start()
        t0 = time.monotonic()
        with pytest.raises(EndpointError, match=r"127\.0\.0\.1:\d+/v1/chat/completions failed after 3 attempts"):
            policy.propose_many(reqs)
        assert time.monotonic() - t0 < 60
    finally:
        srv.stop()


def test_native_server_with_parallel_slots_is_deterministic_across_concurrency():
    """llama.cpp's own llama-server (4 slots, continuous batching): same replies whatever the concurrency."""
    from agentrm.policies.llama_server import ServerUnavailable, llama_server_binary

    try:
        llama_server_binary()
    except ServerUnavailable as e:
        pytest.skip(str(e))
    with LlamaServer(smollm2_gguf(), n_threads=1, parallel=4) as srv:
        assert "--parallel" in srv.command()
        kw = dict(temperature=0.0, max_tokens=12, seed=5, limits=RequestLimits(read_timeout=60, max_retries=1))
        reqs = [(None, _history(i), 1) for i in range(4)]
        a = OpenAIChatPolicy(srv.base_url, "smollm2", max_concurrency=1, **kw).propose_many(reqs)
        b = OpenAIChatPolicy(srv.base_url, "smollm2", max_concurrency=4, **kw).propose_many(reqs)
        assert [len(x) for x in a] == [1] * 4 and a == b


def test_parallel_slots_need_the_native_server(monkeypatch, tmp_path):
    from agentrm.policies.llama_server import ServerUnavailable

    monkeypatch.setenv("AGENTRM_LLAMA_SERVER", str(tmp_path / "missing"))
    with pytest.raises(ServerUnavailable, match="build_llama_server.sh --native"):
        LlamaServer(smollm2_gguf(), parallel=2)
