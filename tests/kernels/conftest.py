"""Kernel tests (seeded by the ``seed`` fixture of ``tests/conftest.py``) run the Triton kernels on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported (triton decorates its own standard
library, ``tl.sum`` etc., at import). This file sets it to 1 only where no CUDA device is visible and the
caller did not choose (:func:`interpreter_wanted`): on a GPU machine ``pytest -m gpu tests`` collects this
folder too, and an unconditional setting would put the CUDA kernel tests of ``tests/gpu`` in interpreter
mode. Setting it here works when this folder is collected first or alone (``pytest tests/kernels``). When
an earlier test folder has already imported triton (importing lightning or transformers does), or on a
CUDA machine, ``agentrm.kernels.interpreter_ready()`` is False: the in-process Triton tests skip and
``test_triton_paths_in_fresh_process`` reruns this folder in a fresh interpreter-mode process instead.
(Setting ``TRITON_INTERPRET=1`` in the environment avoids the rerun.)
"""

import os
from collections.abc import Mapping

import torch  # (does not import triton)

INTERPRET_ENV = "TRITON_INTERPRET"


def interpreter_wanted(cuda_available: bool, environ: Mapping[str, str]) -> bool:
    """Whether this folder should turn the Triton interpreter on: no CUDA, and the variable is unset."""
    return not cuda_available and INTERPRET_ENV not in environ


if interpreter_wanted(torch.cuda.is_available(), os.environ):
    os.environ[INTERPRET_ENV] = "1"

import pytest  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return f"agentrm.kernels tests: {INTERPRET_ENV}={os.environ.get(INTERPRET_ENV)}"
