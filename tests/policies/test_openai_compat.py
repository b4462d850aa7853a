"""OpenAIChatPolicy against local servers on real sockets: n samples, retries/backoff, bounded waits, readiness.

The servers (:mod:`tests.policies.fake_openai`) answer, fail, hang, trickle or are absent; elapsed times are
checked against the configured deadline with a small slack, and every error is one line naming the URL.
"""

from __future__ import annotations

import re
import time

import pytest

from agentrm.policies.base import start_history
from agentrm.policies.openai_compat import EndpointError, EndpointUnavailable, OpenAIChatPolicy, RequestLimits
from tests.policies.fake_openai import ChatServer, HungServer, TrickleServer, closed_port_url

SLACK = 1.0  # seconds allowed past a deadline (thread wake-ups, a loaded CI machine)
HI = [{"role": "user", "content": "hi"}]


def _history():
    return start_history("babyai/GoToRedBall", "Mission: go to the red ball.\nFacing east.")


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


# --- requests ---------------------------------------------------------------------------------------------


def test_propose_sends_chat_and_parses_n_actions():
    with ChatServer() as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", api_key="sk-x", temperature=0.7, max_tokens=16, seed=5)
        acts = pol.propose(None, _history(), k=3)
    assert acts == ["move forward0", "move forward1", "move forward2"]
    req = srv.requests[0]
    assert req["n"] == 3 and req["model"] == "tiny" and req["temperature"] == 0.7 and req["max_tokens"] == 16
    assert req["messages"] == _history().to_messages() and req["auth"] == "Bearer sk-x"
    assert pol.usage["prompt_tokens"] == 7 and pol.usage["completion_tokens"] == 9


def test_server_ignoring_n_is_asked_again():
    with ChatServer(max_n=1) as srv:
        replies = OpenAIChatPolicy(srv.url, "tiny").chat(HI, n=3)
    assert len(replies) == 3 and [r["n"] for r in srv.requests] == [3, 2, 1]


def test_a_keyed_call_sends_a_seed_of_its_key_not_of_its_place():
    """The judge keys its calls by prompt: the HTTP seed (vLLM and llama.cpp sample by it) is then a function of the
    key and the client's seed only, the same after other calls, below 2**31; unkeyed calls count."""
    from agentrm.policies.chat import KEY_INDEX_RANGE

    with ChatServer() as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", seed=5, max_concurrency=2)
        pol.chat(HI, key="the prompt")
        pol.chat(HI)
        pol.chat(HI)
        pol.chat(HI, key="the prompt")
        pol.chat_many([(HI, 1), (HI, 1)], keys=[None, "the prompt"])
        OpenAIChatPolicy(srv.url, "tiny", seed=6).chat(HI, key="the prompt")
    seeds = [r["seed"] for r in srv.requests]
    assert seeds[0] == seeds[3] and seeds[1:3] == [5 + 1009, 5 + 2 * 1009]
    assert sorted(seeds[4:6]) == sorted([5 + 4 * 1009, seeds[0]])  # chat_many's two requests go concurrently
    assert seeds[6] == seeds[0] + 1 and 0 <= seeds[0] < 5 + KEY_INDEX_RANGE * 1009 < 2**31
    with pytest.raises(ValueError, match="1 keys for 2 prompts"):
        OpenAIChatPolicy("http://127.0.0.1:9/v1", "tiny").chat_many([(HI, 1), (HI, 1)], keys=["a"])


@pytest.mark.parametrize("status", [503, 429])
def test_retries_with_backoff_then_succeeds(status, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("agentrm.policies.endpoint.time.sleep", sleeps.append)
    with ChatServer(fail_first=2, fail_status=status) as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", limits=RequestLimits(max_retries=3, backoff=0.1))
        assert pol.propose(None, _history(), k=1) == ["move forward0"]
    assert len(srv.requests) == 3 and pol.usage["retries"] == 2
    assert sleeps == pytest.approx([0.1, 0.2])


def test_503_then_200_recovers_in_real_time():
    with ChatServer(fail_first=2, fail_status=503) as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", limits=RequestLimits(max_retries=3, backoff=0.05, deadline_s=5))
        t0 = time.monotonic()
        assert pol.chat(HI) == ["Thought: go.\nAction: move forward0"]
    assert time.monotonic() - t0 < 0.15 + SLACK  # two pauses: 0.05 + 0.1
    assert pol.usage["requests"] == 3 and pol.usage["retries"] == 2


def test_client_error_fails_fast():
    with ChatServer(fail_first=5, fail_status=400) as srv:
        with pytest.raises(EndpointError, match="HTTP 400") as err:
            OpenAIChatPolicy(srv.url, "tiny", limits=RequestLimits(max_retries=3, backoff=0.0)).chat(HI)
    assert len(srv.requests) == 1 and not isinstance(err.value, EndpointUnavailable)
    assert f"{srv.url}/chat/completions" in _one_line(err)


def test_down_server_error_names_url():
    url = closed_port_url()
    pol = OpenAIChatPolicy(url, "tiny", limits=RequestLimits(max_retries=2, backoff=0.001, read_timeout=2))
    with pytest.raises(EndpointUnavailable) as err:
        pol.propose(None, _history(), k=2)
    msg = _one_line(err)
    assert f"{url}/chat/completions" in msg and "after 3 attempts" in msg and "cannot connect" in msg
    assert pol.usage["requests"] == 3


# --- bounded waits ----------------------------------------------------------------------------------------


def test_hung_server_fails_at_the_deadline_with_notices(capsys):
    """A server that accepts connections and never answers costs one deadline, with throttled stderr lines."""
    with HungServer() as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", limits=RequestLimits(read_timeout=60, max_retries=5, deadline_s=1.5, wait_notice_s=0.4))
        t0 = time.monotonic()
        with pytest.raises(EndpointUnavailable) as err:
            pol.chat(HI)
        elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 1.5 + SLACK
    msg = _one_line(err)
    assert msg.startswith(f"openai policy: {srv.url}/chat/completions did not answer within 1.5 s (1 attempt in ")
    assert "no answer within 1.5 s (read timeout)" in msg
    notices = capsys.readouterr().err.strip().splitlines()
    assert 2 <= len(notices) <= 4, notices  # at 0.4, 0.8, 1.2 s: never more than one per period
    assert all(re.fullmatch(rf"openai policy: waiting for {re.escape(srv.url)}/chat/completions: \d+ s, "
                            r"attempt 1/6", n) for n in notices), notices


def test_read_timeout_per_attempt_then_retries_are_counted(capsys):
    with HungServer() as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", limits=RequestLimits(read_timeout=0.3, max_retries=2, backoff=0.01, deadline_s=30, wait_notice_s=0.5, label="judge"))
        t0 = time.monotonic()
        with pytest.raises(EndpointUnavailable) as err:
            pol.chat(HI)
        elapsed = time.monotonic() - t0
        assert srv.connections == 3
    assert 0.9 <= elapsed < 0.9 + SLACK
    assert re.match(rf"judge: {re.escape(srv.url)}/chat/completions failed after 3 attempts \(\d\.\d s\); "
                    r"last error: no answer within 0\.3 s \(read timeout\)$", _one_line(err))
    assert "attempt 2/3" in capsys.readouterr().err


def test_retry_pause_never_outlasts_the_deadline():
    """A server asking to come back in 10 s (Retry-After) is not waited for past a 1 s deadline."""
    with ChatServer(fail_first=100, fail_status=503, retry_after="10") as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", limits=RequestLimits(max_retries=5, max_backoff=10, deadline_s=1.0))
        t0 = time.monotonic()
        with pytest.raises(EndpointUnavailable, match=r"did not answer within 1 s \(1 attempt in .*HTTP 503") as err:
            pol.chat(HI)
    assert time.monotonic() - t0 < SLACK
    _one_line(err)


def test_trickling_answer_is_cut_at_the_deadline():
    with TrickleServer(every=0.05) as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", limits=RequestLimits(read_timeout=5, deadline_s=1.0))
        t0 = time.monotonic()
        with pytest.raises(EndpointUnavailable, match="still arriving at the deadline") as err:
            pol.chat(HI)
        assert 1.0 <= time.monotonic() - t0 < 1.0 + SLACK
    _one_line(err)


def test_concurrent_batch_on_a_hung_server_costs_one_deadline():
    """Queued calls are cancelled once one fails: 6 calls, 2 at a time, end after one deadline, not three."""
    with HungServer() as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", max_concurrency=2, limits=RequestLimits(deadline_s=1.0, wait_notice_s=None))
        t0 = time.monotonic()
        with pytest.raises(EndpointUnavailable, match="did not answer within 1 s"):
            pol.chat_many([(HI, 1)] * 6)
        assert time.monotonic() - t0 < 1.0 + SLACK
        assert srv.connections == 2


@pytest.mark.parametrize("field", ["read_timeout", "connect_timeout", "deadline_s"])
def test_nonpositive_timeouts_are_refused(field):
    with pytest.raises(ValueError, match=f"{field} must be > 0"):
        RequestLimits(**{field: 0})
    with pytest.raises(ValueError, match="ready_timeout_s must be > 0"):
        OpenAIChatPolicy("http://127.0.0.1:1/v1", "tiny", ready_timeout_s=0)


# --- readiness --------------------------------------------------------------------------------------------


def test_ready_when_the_model_is_listed():
    with ChatServer(models=["tiny", "other"], accept={"tiny", "other"}) as srv:
        OpenAIChatPolicy(srv.url, "tiny").check_ready()
    assert srv.gets == ["/v1/models"] and srv.requests == []  # no chat request needed


def test_ready_when_an_unlisted_name_is_accepted_or_there_is_no_model_list():
    # llama.cpp lists its GGUF file but serves it under any name; a server without /models is asked to chat
    for models in (["/models/smollm2.gguf"], None):
        with ChatServer(models=models, accept=None) as srv:
            OpenAIChatPolicy(srv.url, "smollm2").check_ready()
        assert srv.requests[0]["max_tokens"] == 1 and srv.requests[0]["model"] == "smollm2"


def test_model_not_served_lists_the_served_ones():
    with ChatServer(models=["llama-3-8b", "qwen-7b"], accept={"llama-3-8b", "qwen-7b"}) as srv:
        with pytest.raises(EndpointError) as err:
            OpenAIChatPolicy(srv.url, "tiny").check_ready()
    assert not isinstance(err.value, EndpointUnavailable)
    assert _one_line(err).startswith(f"openai policy: {srv.url} does not serve model 'tiny' "
                                     "(it serves 'llama-3-8b', 'qwen-7b'); a 1-token request for it got HTTP 404")


def test_no_model_list_and_chat_refuses():
    with ChatServer(models=None, accept={"other"}) as srv:
        with pytest.raises(EndpointError, match=r"has no model list \(GET /models: HTTP 404\) and a 1-token "
                                                r"request for model 'tiny' got HTTP 404") as err:
            OpenAIChatPolicy(srv.url, "tiny").check_ready()
    _one_line(err)


def test_ready_check_on_a_hung_server_is_bounded():
    with HungServer() as srv:
        pol = OpenAIChatPolicy(srv.url, "tiny", ready_timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(EndpointUnavailable) as err:
            pol.check_ready()
        assert time.monotonic() - t0 < 0.5 + SLACK
    assert _one_line(err) == (f"openai policy: {srv.url} is not reachable: "
                              f"no answer to GET {srv.url}/models within 0.5 s")


def test_ready_check_on_a_closed_port_fails_at_once():
    url = closed_port_url()
    t0 = time.monotonic()
    with pytest.raises(EndpointUnavailable) as err:
        OpenAIChatPolicy(url, "tiny").check_ready()
    assert time.monotonic() - t0 < SLACK
    assert re.fullmatch(rf"openai policy: {re.escape(url)} is not reachable: cannot connect \(.*refused.*\)",
                        _one_line(err)), str(err.value)


def test_ready_check_names_every_failing_replica():
    down = closed_port_url()
    with ChatServer(models=["tiny"]) as good, ChatServer(models=["big"], accept={"big"}) as wrong:
        with pytest.raises(EndpointUnavailable) as err:
            OpenAIChatPolicy([good.url, down, wrong.url], "tiny").check_ready()
    msg = _one_line(err)
    assert msg.startswith(f"openai policy: {down} is not reachable") and good.url not in msg
    assert f"; {wrong.url} does not serve model 'tiny' (it serves 'big')" in msg


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://127.0.0.1:21/v1"])
def test_a_url_that_is_not_http_fails_in_one_line(url):
    pol = OpenAIChatPolicy(url, "tiny", limits=RequestLimits(max_retries=5))
    for call in (pol.check_ready, lambda: pol.chat(HI)):
        with pytest.raises(EndpointError, match="not a valid http\\(s\\) URL") as err:
            call()
        assert url in _one_line(err) and not isinstance(err.value, EndpointUnavailable)
    assert pol.usage["requests"] == 1  # not retried


def test_ready_check_sends_the_api_key():
    with ChatServer(models=None, accept=None) as srv:
        OpenAIChatPolicy(srv.url, "tiny", api_key="sk-y").check_ready()
    assert srv.requests[0]["auth"] == "Bearer sk-y"
