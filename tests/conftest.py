"""Shared fixtures: small trajectories and a tokenizer trained on them (no hub access)."""

from __future__ import annotations

import os
import time
import zlib

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA the Triton kernels are tested through the interpreter; it must be chosen
# before anything (lightning, transformers) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from agentrm.data.schema import Step, Trajectory  # noqa: E402
from agentrm.data.tiny_tokenizer import train_tiny_tokenizer, trajectory_texts  # noqa: E402

SEED_ENV = "AGENTRM_TEST_SEED"
# One session seed, new each run (broad coverage) unless $AGENTRM_TEST_SEED replays a printed one.
SESSION_SEED = int(os.environ.get(SEED_ENV) or time.time_ns() % 2**31)


def pytest_report_header(config: pytest.Config) -> str:
    return f"agentrm test seed: {SEED_ENV}={SESSION_SEED} (set it to replay this run's random cases)"


def seed_for(session_seed: int, nodeid: str) -> int:
    """A test's seed: a function of the session seed and the test id only, so replaying one test alone
    (``AGENTRM_TEST_SEED=<session seed> pytest <test id>``) draws the same numbers as in the full run."""
    return (session_seed ^ zlib.crc32(nodeid.encode())) % 2**31


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch for the random cases of a test; the replay command is printed (shown on failure)."""
    value = seed_for(SESSION_SEED, request.node.nodeid)
    torch.manual_seed(value)
    print(f"torch seed {value}; replay: {SEED_ENV}={SESSION_SEED} pytest '{request.node.nodeid}'")
    return value


def make_trajectory(tid: str, n_steps: int, success: bool = True, group: str | None = None) -> Trajectory:
    steps = [
        Step(action=f"move forward {i}", observation=f"You see a red ball {n_steps - i} steps ahead.",
             value=(i + 1) / max(1, n_steps) if success else 0.1)
        for i in range(n_steps)
    ]
    return Trajectory(id=tid, task="GoToRedBall", instruction="Go to the red ball. You see a wall.",
                      steps=steps, reward=0.9 if success else 0.0, success=success,
                      meta={"group": group} if group else {})


@pytest.fixture(scope="session")
def small_trajectories() -> list[Trajectory]:
    return [make_trajectory(f"t{i}", n_steps=i % 5, success=i % 2 == 0) for i in range(12)]


@pytest.fixture(scope="session")
def tiny_tokenizer(small_trajectories):
    return train_tiny_tokenizer(trajectory_texts(small_trajectories), vocab_size=400)
