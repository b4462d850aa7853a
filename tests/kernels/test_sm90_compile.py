"""The log-ratio Triton kernels compile for an H100 (sm_90) here, without a GPU (``sm90_compile.py``).

The CPU tests run the kernels through the interpreter, which accepts code that the GPU compiler rejects;
this compiles the real pipeline down to a cubin for every dtype combination the GPU run uses, so a kernel
edit that would only fail on the lent GPU fails in CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentrm.kernels import triton_available

SCRIPT = Path(__file__).with_name("sm90_compile.py")
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


def compile_for_sm90(tmp_path: Path, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a warm cache
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()


def test_kernels_compile_for_sm90_with_tensor_core_dots(tmp_path):
    lines = compile_for_sm90(tmp_path, "--quick")
    assert len(lines) == 2 * 2 and all(ln.startswith("ok ") for ln in lines), lines
    assert all("wgmma" in ln for ln in lines), lines  # Hopper tensor-core dots


@pytest.mark.slow
def test_every_dtype_variant_compiles_for_sm90(tmp_path):
    lines = compile_for_sm90(tmp_path)
    assert len(lines) == 2 * 5 + 2 and all(ln.startswith("ok ") for ln in lines), lines
    assert all("wgmma" in ln for ln in lines if ln.startswith(("ok fwd", "ok bwd"))), lines


@pytest.mark.slow
def test_every_autotune_config_compiles_for_sm90(tmp_path):
    lines = compile_for_sm90(tmp_path, "--all")
    assert all(ln.startswith("ok ") for ln in lines) and len(lines) > 40, lines
