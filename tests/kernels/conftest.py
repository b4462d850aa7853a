"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET`` must be set before a kernel is decorated; the kernels in ``agentrm.kernels`` are
decorated lazily (on first launch), so setting it here, before any test in this folder runs, takes effect
even if another test folder imported ``triton`` or ``agentrm.kernels`` earlier. ``test_interpreter_active``
checks that it did.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return f"agentrm.kernels tests: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, printed (pytest shows it when the test fails)."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    print(f"torch seed = {value}")
    return value
