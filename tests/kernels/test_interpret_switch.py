"""``tests/kernels/conftest.py`` turns the Triton interpreter on only without CUDA.

On a GPU machine ``pytest -m gpu tests`` (what ``bench/gpu_check.py`` ran) collects this folder too; a
conftest that set ``TRITON_INTERPRET=1`` unconditionally put the CUDA kernel tests in interpreter mode. The
decision is checked directly and through the real conftest import path: a pytest run in a fresh process
whose ``torch.cuda.is_available`` is patched to True by a plugin loaded before any conftest.
"""

import os
import subprocess
import sys

import pytest

from agentrm.paths import PROJECT_ROOT
from tests.kernels.conftest import INTERPRET_ENV, interpreter_wanted

PLUGIN = '''
import os
import torch

torch.cuda.is_available = lambda: True  # the GPU invocation, as far as the conftests can tell


def pytest_collection_finish(session):
    # after every conftest and test module of the run was imported
    print(f"interpret-probe: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}", flush=True)
'''
PLAIN = PLUGIN.replace("torch.cuda.is_available = lambda: True", "pass")


def test_decision():
    assert interpreter_wanted(cuda_available=False, environ={}) is True
    assert interpreter_wanted(cuda_available=True, environ={}) is False  # the GPU run
    assert interpreter_wanted(cuda_available=False, environ={INTERPRET_ENV: "0"}) is False  # caller chose
    assert interpreter_wanted(cuda_available=True, environ={INTERPRET_ENV: "1"}) is False  # already set


def collect_with(plugin_source: str, tmp_path) -> str:
    """``pytest --collect-only -m gpu tests/kernels tests/gpu/test_kernels_gpu.py`` in a fresh process with ``plugin_source``
    loaded first; returns the probe's line."""
    (tmp_path / "interpret_probe.py").write_text(plugin_source)
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-p", "interpret_probe", "-p", "no:cacheprovider", "--collect-only",
           "-q", "-m", "gpu", "tests/kernels", "tests/gpu/test_kernels_gpu.py"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("interpret-probe:")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests/gpu/test_kernels_gpu.py::" in proc.stdout  # the CUDA kernel tests were collected
    return lines[0]


def test_gpu_invocation_leaves_the_interpreter_off(tmp_path):
    assert collect_with(PLUGIN, tmp_path) == "interpret-probe: TRITON_INTERPRET=None"


def test_cpu_invocation_turns_it_on(tmp_path):
    """The control: the same run without the patch (no CUDA here) sets it, so the check above can fail."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is visible: the unpatched run is the GPU run")
    assert collect_with(PLAIN, tmp_path) == "interpret-probe: TRITON_INTERPRET=1"
