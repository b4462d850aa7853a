"""Config checks of ``python -m agentrm.serve`` and of the remote scorer spec, in process (the fault-injection
suite runs the main refusals through the real command line: tests/faults/cases_serve.py)."""

from __future__ import annotations

import pytest

from agentrm.checks import ConfigError
from agentrm.search.specs import ScorerSpec, check_scorer
from agentrm.serve.config import ServeConfig
from agentrm.serve.schema import Limits, TokenCounter, TrajectoriesRequest, check_limits


@pytest.mark.parametrize("over,message", [
    ({"model": None}, "model: give the exported RM directory"),
    ({"max_candidates": -3}, "max_candidates: must be >= 1, got -3"),
    ({"host": "10.1.2.3"}, "host: must be one of"),
    ({"cache_bytes": "lots"}, "cache_bytes: "),
    ({"cache_bytes": "auto"}, "cache_bytes: give a size"),
    ({"batch_timeout": 5.0, "request_timeout": 1.0}, "request_timeout: must be a number of seconds > batch_timeout"),
    ({"scorer": ScorerSpec(outcome_blind=False)}, "scorer.outcome_blind: the server scores what it is given"),
    ({"scorer": ScorerSpec(kind="judge")}, "scorer.kind: must be one of"),
    ({"scorer": ScorerSpec(path="other")}, "model: 'rm' and scorer.path 'other' disagree"),
    ({"api_key_env": "not a name"}, "api_key_env: must name an environment variable"),
    ({"log_level": "loud"}, "log_level: must be one of"),
])
def test_bad_serve_configs_are_refused_naming_the_field(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServeConfig(**{"model": "rm", **over})


def test_key_rules(monkeypatch):
    monkeypatch.delenv("K_SERVE", raising=False)
    assert ServeConfig(model="rm", api_key_env="K_SERVE").api_key() is None  # local: no key needed
    with pytest.raises(ConfigError, match="host: :: is reachable from other machines"):
        ServeConfig(model="rm", api_key_env="K_SERVE", host="::").api_key()
    monkeypatch.setenv("K_SERVE", "x" * 16)
    assert ServeConfig(model="rm", api_key_env="K_SERVE", host="0.0.0.0").api_key() == "x" * 16


@pytest.mark.parametrize("spec,message", [
    (ScorerSpec(kind="remote"), r"scorers\[0\].url: scorer kind 'remote' needs the server's http\(s\) base URL"),
    (ScorerSpec(kind="remote", url="http://h:1", path="rm"), r"scorers\[0\].path: a remote scorer's model"),
    (ScorerSpec(kind="remote", url="http://h:1", aggregate="min"), r"scorers\[0\].aggregate: a remote scorer's"),
    (ScorerSpec(kind="remote", url="http://h:1", device="cpu"), r"scorers\[0\]: device applies to a locally"),
    (ScorerSpec(kind="remote", url="http://h:1", api_key_env="sk-123 secret"), r"api_key_env: must name an env"),
    (ScorerSpec(kind="value_rm", path="rm", url="http://h:1"), r"scorers\[0\].url: url and api_key_env apply"),
    (ScorerSpec(kind="remote", url="http://h:1", request_deadline_s=0), r"request_deadline_s: must be"),
])
def test_bad_remote_specs_are_refused_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_scorer(spec, "scorers[0]")


def test_token_limit_counts_tokens_only_when_the_characters_could_exceed_it():
    class CountingTokenizer:
        calls = 0

        def __call__(self, texts, add_special_tokens=False):
            CountingTokenizer.calls += 1
            return {"input_ids": [t.split() for t in texts]}  # one token per word

    limits = Limits(max_sequence_tokens=10)
    counter = TokenCounter(CountingTokenizer(), 10)
    short = TrajectoriesRequest.model_validate({"trajectories": [{"instruction": "a b c"}]})
    check_limits(short, limits, counter)
    assert CountingTokenizer.calls == 0
    long_but_few = TrajectoriesRequest.model_validate({"trajectories": [{"instruction": "word " * 5}]})
    check_limits(long_but_few, limits, counter)  # 25 characters, 5 tokens
    assert CountingTokenizer.calls == 1
    too_many = TrajectoriesRequest.model_validate({"trajectories": [{"instruction": "w " * 11}]})
    with pytest.raises(ValueError, match=r"trajectories\[0\]: 11 tokens > max_sequence_tokens=10"):
        check_limits(too_many, limits, counter)


def test_batching_defaults_to_cuda_only():
    assert ServeConfig(model="rm").batch_size_for("cpu") == 1
    assert ServeConfig(model="rm").batch_size_for("cuda") == 16
    assert ServeConfig(model="rm", max_batch_size=4).batch_size_for("cpu") == 4
    with pytest.raises(ConfigError, match="max_batch_size: must be >= 1"):
        ServeConfig(model="rm", max_batch_size=0)
