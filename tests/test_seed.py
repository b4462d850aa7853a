"""The ``seed`` fixture: printed, replayable with ``AGENTRM_TEST_SEED``, per-test and independent of order."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from agentrm.paths import PROJECT_ROOT
from tests.conftest import SEED_ENV, seed_for


def test_seed_depends_on_session_seed_and_test_id_only():
    assert seed_for(7, "tests/a.py::t") == seed_for(7, "tests/a.py::t")
    assert seed_for(7, "tests/a.py::t") != seed_for(8, "tests/a.py::t")
    assert seed_for(7, "tests/a.py::t") != seed_for(7, "tests/a.py::u")


def test_draws(seed):
    """Helper for the replay test below: prints what the seeded generator draws."""
    print("draws", torch.rand(3).tolist())


def _draws(session_seed: str) -> tuple[str, str]:
    env = {**os.environ, SEED_ENV: session_seed}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_seed.py::test_draws"]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300).stdout
    header = re.search(rf"{SEED_ENV}=(\d+)", out)
    draws = re.search(r"draws \[.*\]", out)
    assert header and draws, out[-2000:]
    return header.group(1), draws.group(0)


def test_env_var_replays_a_run():
    first, second = _draws("424242"), _draws("424242")
    assert first[0] == "424242" and first == second
