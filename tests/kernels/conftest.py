"""Kernel tests (seeded by the ``seed`` fixture of ``tests/conftest.py``) run the Triton kernels on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported (triton decorates its own standard
library, ``tl.sum`` etc., at import). Setting it here works when this folder is collected first or alone
(``pytest tests/kernels``). When an earlier test folder has already imported triton (importing lightning or
transformers does), ``agentrm.kernels.interpreter_ready()`` is False: the in-process Triton tests skip and
``test_triton_paths_in_fresh_process`` reruns this folder in a fresh interpreter-mode process instead.
(Setting ``TRITON_INTERPRET=1`` in the environment avoids the rerun.)
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return f"agentrm.kernels tests: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
