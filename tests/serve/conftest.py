"""Shared real servers for the serving tests: one value RM and one implicit PRM, each started once per session."""

from __future__ import annotations

import pytest

from tests.serve.server_proc import KEY, KEY_ENV, ServerProcess, export_tiny_models

# small limits so that the refusals are cheap to reach
LIMITS = ["--max_items", "8", "--max_candidates", "16", "--max_request_bytes", "65536",
          "--max_sequence_tokens", "1500", "--max_queue", "8", "--max_batch_size", "8", "--batch_timeout", "0.01"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    return export_tiny_models(tmp_path_factory.mktemp("serve_models"))


@pytest.fixture(scope="session")
def rm_server(tiny_models, tmp_path_factory):
    with ServerProcess(tiny_models["value_rm"], LIMITS, log=tmp_path_factory.mktemp("logs") / "rm.log") as s:
        yield s


@pytest.fixture(scope="session")
def prm_server(tiny_models, tmp_path_factory):
    with ServerProcess(tiny_models["implicit_prm"], LIMITS, log=tmp_path_factory.mktemp("logs") / "prm.log") as s:
        yield s


@pytest.fixture
def api_key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY
