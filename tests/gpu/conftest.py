"""GPU-only tests: every test here carries the ``gpu`` marker and skips cleanly without CUDA.

Run them (and the kernel sweep) with ``python bench/gpu_check.py``, or alone with ``pytest -m gpu``.
"""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
